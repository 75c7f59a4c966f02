#!/usr/bin/env bash
# Record the user turns of script.json with espeak-ng and keep them as FLAC with sox (Debian:
# apt-get install espeak-ng sox). Run once: the files are kept in the repository so that every
# run hears the same turns.
set -euo pipefail
cd "$(dirname "$0")"
python3 -c 'import json; [print(t["file"], t["text"]) for t in json.load(open("script.json"))["turns"]]' |
while read -r file text; do
    espeak-ng -v en-us -s 150 --stdout "$text" | sox -q -t wav - "$file"
done
