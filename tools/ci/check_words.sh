#!/usr/bin/env bash
# The product speaks of the software only: no development history (sessions, lettered
# benchmark runs, issue numbers, rounds of work) and no references to notes that are not
# in the repository. Lists every tracked line that matches and fails if there is one.
set -euo pipefail
cd "$(dirname "$0")/../.."
patterns=(
  '\bSPEC\b'
  '\b[Ii]ssues? #?[0-9]+'
  '(?i)\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth) session\b'
  '\b[Rr]uns? [A-J]\b'
  '(?i)\bround of (work|changes)\b'
)
files=$(git ls-files | grep -v -e '^docs/results/' -e '^tools/ci/check_words.sh$' -e '\.json$' -e '\.png$')
status=0
for p in "${patterns[@]}"; do
  if hits=$(grep -n -P -- "$p" $files); then
    printf '%s\n' "$hits"
    status=1
  fi
done
if [ "$status" -ne 0 ]; then
  echo "check_words: the lines above speak of how the software was made; say what it is and does" >&2
fi
exit "$status"
