#!/bin/bash
# System packages the test suite needs, installed with apt-get only when missing (idempotent):
#   - slurm-wlm: slurmctld + slurmd + client commands, for the real local-cluster tests
#   - munge: Slurm's authentication daemon
#   - shellcheck: lints slurm/ and launch/ (tests/test_slurm_scripts.py)
# The tests start their own munged/slurmctld/slurmd with private config, keys and sockets, so the
# packages' system services are kept from starting during the install.
set -euo pipefail

packages=(slurm-wlm munge shellcheck)
missing=()
for pkg in "${packages[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$pkg")
	fi
done
((${#missing[@]} == 0)) && exit 0

command -v apt-get >/dev/null || {
	echo "install_system_deps: no apt-get; install these yourself: ${missing[*]}" >&2
	exit 1
}
sudo=()
if ((EUID != 0)); then sudo=(sudo -n); fi

log=$(mktemp)
policy=/usr/sbin/policy-rc.d
cleanup() {
	rm -f "$log"
	if [[ -n ${own_policy:-} ]]; then "${sudo[@]}" rm -f "$policy"; fi
}
trap cleanup EXIT
if [[ ! -e $policy ]]; then
	# Exit status 101 = "action forbidden": invoke-rc.d / deb-systemd-invoke start nothing.
	printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
	"${sudo[@]}" chmod 755 "$policy"
	own_policy=1
fi

echo "install_system_deps: apt-get install ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { "${sudo[@]}" apt-get update -qq &&
	"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
	cat "$log" >&2
	exit 1
fi
