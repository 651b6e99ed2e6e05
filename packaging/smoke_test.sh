#!/bin/sh
# Smoke test of the Linux bundle, rerunnable by anyone after `make package`:
# unpack the tar.gz into a temporary folder, run the bundled app's --selftest
# offscreen twice with a fresh data folder (the first run converts the bundled
# model, as a user's first start does; the second is a warm start), and print the
# bundle and archive sizes and both start-to-answer times. Exits non-zero if a
# self-test fails.
set -eu
cd "$(dirname "$0")/.."
archive=$(ls dist/quire-*-linux-*.tar.gz | head -n 1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xzf "$archive" -C "$work"
app=$(ls -d "$work"/quire-*)/quire
export QUIRE_HOME="$work/home" QT_QPA_PLATFORM=offscreen
for run in first second; do
    start=$(date +%s.%N)
    "$app" --selftest > "$work/$run.json"
    end=$(date +%s.%N)
    echo "$run run: $(echo "$end - $start" | bc) s: $(cat "$work/$run.json")"
done
echo "archive: $(du -b "$archive" | cut -f1) bytes ($archive)"
echo "unpacked bundle: $(du -sb "$(dirname "$app")" | cut -f1) bytes"
