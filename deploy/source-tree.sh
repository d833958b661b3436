# Sourced on a machine where pdserve is not installed (the lent GPU machine): makes this
# checkout importable as `pdserve` through a link, without putting the checkout itself on
# sys.path (its top-level folders would shadow packages such as Hugging Face's `kernels`).
#
#   source .device/setup.sh && source deploy/source-tree.sh && python3 -P -m pdserve.kernels.bench
_pdserve_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p /tmp/pdserve-src
ln -sfn "$_pdserve_root" /tmp/pdserve-src/pdserve
export PYTHONPATH=/tmp/pdserve-src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONSAFEPATH=1
# The `pdserve` command, as the console script would run it.
pdserve() { python3 -P -m pdserve.cluster.cli "$@"; }
export -f pdserve
