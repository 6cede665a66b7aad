# Sourced by the GPU scripts: puts this checkout's three packages on PYTHONPATH
# under their import names (mmap_deploy, mmap_train, mmap_export), so a bare
# GPU machine runs them without installing the project.
MMAP_PKGS=$(mktemp -d)
ln -s "$PWD/mmap_deploy" "$MMAP_PKGS/mmap_deploy"
ln -s "$PWD/train" "$MMAP_PKGS/mmap_train"
ln -s "$PWD/export" "$MMAP_PKGS/mmap_export"
export PYTHONPATH="$MMAP_PKGS${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
