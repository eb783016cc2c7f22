"""Render a kustomization offline, as ``kubectl kustomize`` would, for the fields deploy/k8s uses.

    python deploy/k8s/render.py overlays/gpu        # or: make k8s-render OVERLAY=gpu
    diff <(python deploy/k8s/render.py overlays/gpu) <(kubectl kustomize deploy/k8s/overlays/gpu)

Implemented: ``resources`` (files and kustomization folders), ``namespace``, ``labels`` (metadata
labels only), ``images`` (newName, newTag, digest) and ``patches`` (strategic merge by the
Kubernetes merge keys of the lists used here, JSON 6902 add/replace/remove). Any other field or
option is refused with an error that names it, so a manifest can never rely on something this
renderer silently drops. tests/test_k8s.py renders both overlays with it and validates the result.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KUSTOMIZATION_FIELDS = frozenset(
    {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
)
LABEL_FIELDS = frozenset({"pairs", "includeSelectors", "includeTemplates"})
IMAGE_FIELDS = frozenset({"name", "newName", "newTag", "digest"})
PATCH_FIELDS = frozenset({"path", "patch", "target"})
TARGET_FIELDS = frozenset({"kind", "name", "group", "version"})
JSON_PATCH_OPS = frozenset({"add", "replace", "remove"})

CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "PersistentVolume",
        "StorageClass",
        "CustomResourceDefinition",
        "ClusterRole",
        "PriorityClass",
        "IngressClass",
        "RuntimeClass",
    }
)
# Kinds whose fields name a namespace that kustomize's namespace transformer also rewrites.
NAMESPACE_REFERENCING = frozenset(
    {
        "RoleBinding",
        "ClusterRoleBinding",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "APIService",
    }
)
# Strategic merge: the lists merged item by item, by their Kubernetes patchMergeKey (built-in
# kinds only; a custom resource is merged as a JSON merge patch, where a list is replaced).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
BUILTIN_API_VERSIONS = frozenset({"v1", "apps/v1", "batch/v1", "networking.k8s.io/v1", "policy/v1"})
POD_TEMPLATE_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})
# kustomize's legacy output order (api/resid/gvk.go); other kinds sit between, by kind.
ORDER_FIRST = (
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
)
ORDER_LAST = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")

Resource = dict[str, Any]


class KustomizeError(ValueError):
    """A kustomization this renderer cannot render, or one that is wrong."""


def render(folder: Path) -> list[Resource]:
    """The resources of the kustomization in ``folder``, transformed and in kustomize's order."""
    return sorted(_build(Path(folder).resolve(), ()), key=_order)


def to_yaml(resources: Iterable[Resource]) -> str:
    """Multi-document YAML as kustomize writes it: keys sorted, multi-line strings as blocks."""
    return "---\n".join(
        yaml.dump(r, Dumper=_Dumper, sort_keys=True, default_flow_style=False) for r in resources
    )


# --- one kustomization ------------------------------------------------------------------------


def _build(folder: Path, seen: tuple[Path, ...]) -> list[Resource]:
    if folder in seen:
        raise KustomizeError(f"{folder}: kustomizations include each other ({' -> '.join(map(str, seen))})")
    spec_path = next((folder / n for n in KUSTOMIZATION_FILES if (folder / n).is_file()), None)
    if spec_path is None:
        raise KustomizeError(f"{folder}: no kustomization.yaml")
    spec = yaml.safe_load(spec_path.read_text()) or {}
    _check_fields(spec, KUSTOMIZATION_FIELDS, str(spec_path))
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{spec_path}: kind {spec['kind']!r} not implemented (only Kustomization)")

    resources: list[Resource] = []
    for entry in spec.get("resources") or []:
        resources += _load_entry(folder, str(entry), spec_path, (*seen, folder))
    _check_unique(resources, spec_path)
    for i, entry in enumerate(spec.get("patches") or []):
        _apply_patch(resources, entry, folder, f"{spec_path}: patches[{i}]")
    if "namespace" in spec:
        _set_namespace(resources, str(spec["namespace"]), spec_path)
    for i, entry in enumerate(spec.get("labels") or []):
        _add_labels(resources, entry, f"{spec_path}: labels[{i}]")
    for i, entry in enumerate(spec.get("images") or []):
        _set_image(resources, entry, f"{spec_path}: images[{i}]")
    _check_unique(resources, spec_path)
    return resources


def _load_entry(folder: Path, entry: str, where: Path, seen: tuple[Path, ...]) -> list[Resource]:
    if "://" in entry or entry.startswith("github.com/"):
        raise KustomizeError(f"{where}: remote resource {entry!r} not implemented (local paths only)")
    path = (folder / entry).resolve()
    if path.is_dir():
        return _build(path, seen)
    if not path.is_file():
        raise KustomizeError(f"{where}: resource {entry!r} does not exist")
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or not all(k in doc for k in ("apiVersion", "kind")):
            raise KustomizeError(f"{path}: every document needs apiVersion and kind")
        if not (doc.get("metadata") or {}).get("name"):
            raise KustomizeError(f"{path}: a {doc['kind']} without metadata.name")
    return docs


def _id(r: Resource) -> tuple[str, str, str, str]:
    group = r["apiVersion"].rpartition("/")[0]
    return group, r["kind"], r["metadata"].get("namespace", ""), r["metadata"]["name"]


def _check_unique(resources: list[Resource], where: Path) -> None:
    ids = [_id(r) for r in resources]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise KustomizeError(f"{where}: resource(s) defined twice: {dupes}")


def _order(r: Resource) -> tuple[int, str, str, str]:
    kind = r["kind"]
    if kind in ORDER_FIRST:
        rank = ORDER_FIRST.index(kind)
    elif kind in ORDER_LAST:
        rank = len(ORDER_FIRST) + 1 + ORDER_LAST.index(kind)
    else:
        rank = len(ORDER_FIRST)
    return rank, f"{r['apiVersion']}/{kind}", r["metadata"].get("namespace", ""), r["metadata"]["name"]


# --- transformers -----------------------------------------------------------------------------


def _set_namespace(resources: list[Resource], namespace: str, where: Path) -> None:
    for r in resources:
        kind, name = r["kind"], r["metadata"]["name"]
        if kind in NAMESPACE_REFERENCING:
            raise KustomizeError(f"{where}: namespace on a {kind} ({name}) not implemented")
        if kind == "Namespace" and name != namespace:
            raise KustomizeError(f"{where}: renaming Namespace {name!r} to {namespace!r} not implemented")
        if kind not in CLUSTER_SCOPED:
            r["metadata"]["namespace"] = namespace


def _add_labels(resources: list[Resource], entry: Any, where: str) -> None:
    _check_fields(entry, LABEL_FIELDS, where)
    for option in ("includeSelectors", "includeTemplates"):
        if entry.get(option):
            raise KustomizeError(f"{where}: {option}: true not implemented (metadata labels only)")
    pairs = entry.get("pairs") or {}
    for r in resources:
        r["metadata"].setdefault("labels", {}).update({str(k): str(v) for k, v in pairs.items()})


def _set_image(resources: list[Resource], entry: Any, where: str) -> None:
    _check_fields(entry, IMAGE_FIELDS, where)
    if "name" not in entry:
        raise KustomizeError(f"{where}: name is required")
    if "newTag" in entry and "digest" in entry:
        raise KustomizeError(f"{where}: newTag and digest exclude each other")
    for container in _containers(resources):
        name, suffix = _split_image(str(container.get("image", "")))
        if name != entry["name"]:
            continue
        if "digest" in entry:
            suffix = "@" + str(entry["digest"])
        elif "newTag" in entry:
            suffix = ":" + str(entry["newTag"])
        container["image"] = str(entry.get("newName", name)) + suffix


def _containers(resources: list[Resource]) -> Iterable[dict[str, Any]]:
    for r in resources:
        if r["kind"] in POD_TEMPLATE_KINDS:
            pod = r.get("spec", {}).get("template", {}).get("spec", {})
        elif r["kind"] == "Pod":
            pod = r.get("spec", {})
        else:
            continue
        yield from pod.get("initContainers") or []
        yield from pod.get("containers") or []


def _split_image(image: str) -> tuple[str, str]:
    """``registry:5000/name:tag@digest`` -> (``registry:5000/name``, ``:tag@digest``)."""
    name, at, digest = image.partition("@")
    head, slash, last = name.rpartition("/")
    repo, colon, tag = last.partition(":")
    return head + slash + repo, (colon + tag) + (at + digest)


def _check_fields(entry: Any, allowed: frozenset[str], where: str) -> None:
    if not isinstance(entry, dict):
        raise KustomizeError(f"{where}: not a mapping")
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise KustomizeError(
            f"{where}: field(s) {', '.join(unknown)} not implemented by deploy/k8s/render.py "
            f"(it implements {', '.join(sorted(allowed))})"
        )


# --- patches ----------------------------------------------------------------------------------


def _apply_patch(resources: list[Resource], entry: Any, folder: Path, where: str) -> None:
    _check_fields(entry, PATCH_FIELDS, where)
    if ("path" in entry) == ("patch" in entry):
        raise KustomizeError(f"{where}: give exactly one of path and patch")
    text = (folder / entry["path"]).read_text() if "path" in entry else str(entry["patch"])
    body = yaml.safe_load(text)
    target = entry.get("target")
    if target is not None:
        _check_fields(target, TARGET_FIELDS, f"{where}: target")
    if isinstance(body, list):
        if target is None:
            raise KustomizeError(f"{where}: a JSON 6902 patch needs a target")
        for r in _matching(resources, target, where):
            for i, op in enumerate(body):
                _json_patch_op(r, op, f"{where}: op {i}")
    elif isinstance(body, dict):
        if target is None:
            meta = body.get("metadata") or {}
            if "kind" not in body or "name" not in meta:
                raise KustomizeError(
                    f"{where}: a strategic merge patch without a target needs kind and metadata.name"
                )
            target = {"kind": body["kind"], "name": meta["name"]}
        for r in _matching(resources, target, where):
            builtin = r["apiVersion"] in BUILTIN_API_VERSIONS
            patched = _merge(r, {k: v for k, v in body.items() if k != "metadata"}, builtin, where)
            patched["metadata"] = _merge(r["metadata"], _patch_metadata(body), builtin, where)
            r.clear()
            r.update(patched)
    else:
        raise KustomizeError(f"{where}: a patch is a mapping (strategic merge) or a list (JSON 6902)")


def _patch_metadata(body: Resource) -> dict[str, Any]:
    """The patch's metadata less what only identifies its target."""
    return {k: v for k, v in (body.get("metadata") or {}).items() if k not in ("name", "namespace")}


def _matching(resources: list[Resource], target: dict[str, Any], where: str) -> list[Resource]:
    def matches(r: Resource) -> bool:
        group, _, version = r["apiVersion"].rpartition("/")
        return (
            target.get("kind", r["kind"]) == r["kind"]
            and target.get("name", r["metadata"]["name"]) == r["metadata"]["name"]
            and target.get("group", group) == group
            and target.get("version", version) == version
        )

    found = [r for r in resources if matches(r)]
    if not found:
        raise KustomizeError(f"{where}: no resource matches target {target}")
    return found


def _merge(base: Any, patch: Any, builtin: bool, where: str, field: str = "") -> Any:
    """Strategic merge of ``patch`` into ``base`` (a new value; neither is changed)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        directives = sorted(k for k in patch if str(k).startswith("$"))
        if directives:
            raise KustomizeError(f"{where}: patch directive(s) {', '.join(directives)} not implemented")
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], value, builtin, where, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(patch, list) and isinstance(base, list) and builtin and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        if not all(isinstance(item, dict) and key in item for item in base + patch):
            raise KustomizeError(f"{where}: every item of {field} needs its merge key {key!r}")
        # kustomize's order: the patch's items first (merged into their namesakes), then the rest
        merged = [
            _merge(next((old for old in base if old[key] == item[key]), {}), item, builtin, where)
            for item in patch
        ]
        named = {item[key] for item in patch}
        return merged + [copy.deepcopy(old) for old in base if old[key] not in named]
    return copy.deepcopy(patch)


def _json_patch_op(resource: Resource, op: Any, where: str) -> None:
    if not isinstance(op, dict) or op.get("op") not in JSON_PATCH_OPS or "path" not in op:
        raise KustomizeError(f"{where}: op must be one of {', '.join(sorted(JSON_PATCH_OPS))}, with a path")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in str(op["path"]).split("/")[1:]]
    if not parts:
        raise KustomizeError(f"{where}: the whole document cannot be patched")
    parent: Any = resource
    for part in parts[:-1]:
        parent = _step(parent, part, where)
    last = parts[-1]
    kind = op["op"]
    if kind in ("add", "replace") and "value" not in op:
        raise KustomizeError(f"{where}: {kind} needs a value")
    if isinstance(parent, list):
        index = len(parent) if (last == "-" and kind == "add") else _index(parent, last, kind == "add", where)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        else:
            del parent[index]
    elif isinstance(parent, dict):
        if kind != "add" and last not in parent:
            raise KustomizeError(f"{where}: {op['path']} does not exist")
        if kind == "remove":
            del parent[last]
        else:
            parent[last] = copy.deepcopy(op["value"])
    else:
        raise KustomizeError(f"{where}: {op['path']} does not lead into an object or a list")


def _step(node: Any, part: str, where: str) -> Any:
    if isinstance(node, dict) and part in node:
        return node[part]
    if isinstance(node, list):
        return node[_index(node, part, False, where)]
    raise KustomizeError(f"{where}: no {part!r} on the path")


def _index(items: list[Any], part: str, end_ok: bool, where: str) -> int:
    if not part.isdigit() or int(part) > len(items) - (0 if end_ok else 1):
        raise KustomizeError(f"{where}: list index {part!r} out of range")
    return int(part)


# --- output -----------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings as literal blocks (scripts stay readable)."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    """Blocks for multi-line strings, double quotes where a plain scalar would read as another
    type ("8000", "", "true"): kustomize's choices, so the two outputs diff clean."""
    tag = "tag:yaml.org,2002:str"
    if "\n" in value:
        style: str | None = "|"
    elif value == "" or dumper.resolve(yaml.ScalarNode, value, (True, False)) != tag:
        style = '"'
    else:
        style = None
    return dumper.represent_scalar(tag, value, style=style)


_Dumper.add_representer(str, _str)


def _resolve(arg: str) -> Path:
    for candidate in (Path(arg), HERE / arg, HERE / "overlays" / arg):
        if candidate.is_dir():
            return candidate
    raise KustomizeError(f"no kustomization folder {arg!r} (relative to here, {HERE} or {HERE / 'overlays'})")


def main(argv: list[str] | None = None, out: Callable[[str], object] = sys.stdout.write) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "folder", help="a kustomization folder: overlays/gpu, gpu, deploy/k8s/overlays/cpu ..."
    )
    args = parser.parse_args(argv)
    try:
        out(to_yaml(render(_resolve(args.folder))))
    except KustomizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
