"""etc/kubernetes: each overlay renders (kubectl kustomize), validates against Kubernetes' own
schemas (kubernetes-validate, from the package index), passes the "restricted" Pod Security
rules we can check, and carries a pgtwist config and userlist that `pgtwist check` accepts."""

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from pgtwist import config as configmod

yaml = pytest.importorskip("yaml", reason="PyYAML is a test dependency (pip install '.[test]')")

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "etc" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBE / "overlays").iterdir() if (p / "kustomization.yaml").exists())
KUBECTL = shutil.which("kubectl")
KUSTOMIZE = shutil.which("kustomize")
K8S_VERSION = "1.30"  # the oldest minor still in wide use; the manifests use nothing newer


def render(overlay: str) -> list[dict]:
    if KUBECTL is not None:
        args = [KUBECTL, "kustomize", str(KUBE / "overlays" / overlay)]
    elif KUSTOMIZE is not None:
        args = [KUSTOMIZE, "build", str(KUBE / "overlays" / overlay)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed: the overlays cannot be rendered here")
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs, kind) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_validate_against_the_kubernetes_schemas(overlay):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a test dependency (pip install '.[test]')")
    docs = render(overlay)
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD (Prometheus Operator): no schema ships with Kubernetes
        kv.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_is_restricted_and_rolls_on_config_change(overlay):
    docs = render(overlay)
    (deployment,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "pgtwist"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"

    # The ConfigMap and Secret carry a content hash in their names, and the pod mounts those
    # names: a changed config or userlist is a changed pod template, so the pods roll.
    (config_map,) = by_kind(docs, "ConfigMap")
    (secret,) = [s for s in by_kind(docs, "Secret") if s["metadata"]["name"].startswith("pgtwist-users")]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"] != "pgtwist-config"
    assert volumes["users"]["secret"]["secretName"] == secret["metadata"]["name"] != "pgtwist-users"

    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (service,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "pgtwist"]
    ports = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_shipped_config_and_userlist_pass_check(overlay, tmp_path):
    import base64

    docs = render(overlay)
    (config_map,) = by_kind(docs, "ConfigMap")
    (secret,) = [s for s in by_kind(docs, "Secret") if s["metadata"]["name"].startswith("pgtwist-users")]
    text = config_map["data"]["pgbalance.toml"]
    users = base64.b64decode(secret["data"]["userlist.txt"]).decode()
    raw = tomllib.loads(text)
    assert raw["auth_file"] == "/etc/pgtwist-users/userlist.txt"  # where deployment.yaml mounts the Secret
    (tmp_path / "userlist.txt").write_text(users)
    config = tmp_path / "pgbalance.toml"
    config.write_text(text.replace('"/etc/pgtwist-users/userlist.txt"', '"userlist.txt"'))
    configmod.load(config)  # raises ConfigError listing every mistake
