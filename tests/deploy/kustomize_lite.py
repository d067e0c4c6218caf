"""A small pure-Python kustomize, for rendering deploy/k8s/ where `kubectl` is not installed.

It does what the kit's kustomizations use and nothing more: `resources` (files and
directories), `components`, `patches` (strategic-merge files; `$patch: delete`), and `images`.
Anything else raises, so a new kustomize feature in deploy/k8s/ cannot be silently ignored.
Where kubectl is present the tests check that both render the same documents.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

KNOWN_FIELDS = {"apiVersion", "kind", "resources", "components", "patches", "images"}
# Strategic-merge keys of the lists the kit patches (from the Kubernetes API's patchMergeKey);
# any other list is replaced whole, as kustomize does for lists without a merge key.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name",
              "volumes": "name", "volumeMounts": "mountPath", "ports": "containerPort"}


class KustomizeError(ValueError):
    pass


def render(directory: str | Path) -> list[dict]:
    """The documents `kubectl kustomize DIRECTORY` would print (order aside)."""
    return _build(Path(directory), "Kustomization")


def _load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomization(directory: Path, kind: str) -> dict:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    k = yaml.safe_load(path.read_text()) or {}
    if k.get("kind", "Kustomization") != kind:
        raise KustomizeError(f"{path}: kind {k.get('kind')!r}, expected {kind}")
    unknown = set(k) - KNOWN_FIELDS
    if unknown:
        raise KustomizeError(f"{path}: kustomize_lite does not implement {sorted(unknown)}")
    return k


def _build(directory: Path, kind: str, docs: list[dict] | None = None) -> list[dict]:
    k = _kustomization(directory, kind)
    docs = [] if docs is None else docs
    for res in k.get("resources", []):
        path = directory / res
        docs.extend(_build(path, "Kustomization") if path.is_dir() else _load_yaml_docs(path))
    for comp in k.get("components", []):
        docs = _build(directory / comp, "Component", docs)
    for patch in k.get("patches", []):
        if set(patch) != {"path"}:
            raise KustomizeError(f"{directory}: only file patches ({{path: ...}}) are supported")
        for patch_doc in _load_yaml_docs(directory / patch["path"]):
            docs = _apply_patch(docs, patch_doc, directory / patch["path"])
    for image in k.get("images", []):
        for doc in docs:
            _set_image(doc, image)
    return docs


def _same_object(doc: dict, patch: dict) -> bool:
    return (doc.get("kind") == patch.get("kind")
            and doc.get("metadata", {}).get("name") == patch.get("metadata", {}).get("name"))


def _apply_patch(docs: list[dict], patch: dict, where: Path) -> list[dict]:
    targets = [d for d in docs if _same_object(d, patch)]
    if len(targets) != 1:
        raise KustomizeError(f"{where}: patch matches {len(targets)} objects, expected 1")
    if patch.get("$patch") == "delete":
        return [d for d in docs if d is not targets[0]]
    body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
    merge(targets[0], body)
    return docs


def merge(base: dict, patch: dict) -> dict:
    """Strategic merge of `patch` into `base` (in place): maps merge, null deletes, lists with
    a merge key merge item by item, other lists are replaced."""
    for key, value in patch.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(base.get(key), list):
            merge_key = MERGE_KEYS[key]
            for item in value:
                match = next((b for b in base[key] if b.get(merge_key) == item.get(merge_key)),
                             None)
                if match is None:
                    base[key].append(copy.deepcopy(item))
                else:
                    merge(match, item)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _set_image(node, image: dict) -> None:
    if isinstance(node, dict):
        for key in ("containers", "initContainers"):
            for container in node.get(key) or ():
                ref = container.get("image", "")
                name = ref.split("@")[0].rsplit(":", 1)[0] if ":" in ref.split("/")[-1] else \
                    ref.split("@")[0]
                if name == image["name"]:
                    new = image.get("newName", name)
                    if "digest" in image:
                        container["image"] = f"{new}@{image['digest']}"
                    elif "newTag" in image:
                        container["image"] = f"{new}:{image['newTag']}"
                    else:
                        container["image"] = new + ref[len(name):]
        for value in node.values():
            _set_image(value, image)
    elif isinstance(node, list):
        for value in node:
            _set_image(value, image)
