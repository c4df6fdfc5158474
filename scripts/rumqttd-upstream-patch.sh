#!/usr/bin/env bash
# Writes vendor/rumqttd/upstream.patch: every source file of the vendored rumqttd that differs
# from the crates.io release (new files included), as one unified diff against upstream's tree
# (`rumqttd/src/…` paths), after the description kept at the top of the current file (up to
# its first `--- `). Checks that the patch applied to the release gives the vendored sources.
#
# Usage: scripts/rumqttd-upstream-patch.sh      (needs rumqttd-0.20.0 in ~/.cargo/registry)
set -euo pipefail
cd "$(dirname "$0")/../vendor/rumqttd"
RELEASE=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/rumqttd-0.20.0 | head -1)
OUT=$(mktemp)
sed -n '/^--- /q;p' upstream.patch > "$OUT"
(cd src && find . -name '*.rs' | sed 's|^\./||' | sort) | while read -r f; do
  old="$RELEASE/src/$f"; label_old="a/rumqttd/src/$f"
  if [[ ! -f "$old" ]]; then old=/dev/null; label_old=/dev/null; fi
  diff -u --label "$label_old" --label "b/rumqttd/src/$f" "$old" "src/$f" >> "$OUT" || true
done
CHECK=$(mktemp -d)
mkdir -p "$CHECK/rumqttd" && cp -r "$RELEASE/src" "$CHECK/rumqttd/"
(cd "$CHECK" && patch -s -p1 < "$OUT")
diff -r "$CHECK/rumqttd/src" src
rm -rf "$CHECK"
mv "$OUT" upstream.patch
echo "upstream.patch: $(grep -c '^--- ' upstream.patch) files, applies cleanly to rumqttd 0.20.0"
