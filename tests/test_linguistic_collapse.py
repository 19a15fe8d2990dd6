"""scripts/linguistic_collapse.py and its synthetic language (scripts/toy_language.py):
the text is the same on every run (pinned by a digest), stays inside the vocabulary and
round-trips through the word-level tokenizer; the script's measure step on a tiny saved
GPT-2 equals `measure_language_model` on the model in memory and `nctools measure
--model hf:FOLDER --dataset text:FILE`, and its validation loss is the model's own."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from nctools.analysis.lm_measure import measure_language_model
from nctools.cli import main
from nctools.data.text import text_batches, text_documents

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, BATCH, MIN_COUNT = 16, 4, 2


@functools.cache
def script():
    """scripts/linguistic_collapse.py as a module (its sibling modules importable)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(
            "scripts_linguistic_collapse", ROOT / "scripts" / "linguistic_collapse.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return module


def language():
    """scripts/toy_language.py (loaded by the script), its settings and its lexicon."""
    script()
    lang = sys.modules["toy_language"]
    spec = lang.LanguageSpec()
    return lang, spec, lang.Lexicon.build(spec)


def test_the_language_is_deterministic_closed_and_zipfian() -> None:
    lang, spec, lexicon = language()
    words = lexicon.words()
    assert len(words) == len(set(words)) == 886
    assert lang.Lexicon.build(spec) == lexicon
    docs = list(lang.documents(spec, lexicon, 300, seed=7))
    assert docs == list(lang.documents(spec, lexicon, 300, seed=7))
    assert docs != list(lang.documents(spec, lexicon, 300, seed=8))
    # the validation text of the committed results, regenerated here byte for byte
    settings = json.loads((ROOT / "results" / "linguistic-collapse" / "generator.json")
                          .read_text())
    assert settings["language"] == spec.to_dict()
    val = "".join(d + "\n" for d in lang.documents(spec, lexicon, settings["val_docs"],
                                                   seed=script().VAL_SEED))
    assert hashlib.sha256(val.encode()).hexdigest() == settings["val_sha256"]
    assert settings["val_sha256"].startswith("aec3d3e07ba53d2b")
    tokens = [t for d in docs for t in d.split(" ")]
    assert set(tokens) <= set(words) and all(d.endswith(" " + lang.END) for d in docs)
    # Zipf within the nouns: the 1st stem is drawn ~ (11/2)^1.1 = 6.5x as often as the
    # 10th (topic boosts blur it): between 3x and 15x
    counts = Counter(tokens)
    first, tenth = (counts[lexicon.nouns.stems[i]] + counts[lexicon.nouns.stems[i] + "s"]
                    for i in (0, 9))
    assert 3 * tenth < first < 15 * tenth


def test_tokenizer_round_trips_the_text() -> None:
    lang, spec, lexicon = language()
    tokenizer = script().build_tokenizer(lexicon)
    doc = next(lang.documents(spec, lexicon, 1, seed=3))
    ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
    assert ids == [lexicon.words().index(w) for w in doc.split(" ")]
    assert tokenizer.decode(ids) == doc
    assert ids[-1] == tokenizer.eos_token_id == 0


def test_measure_step_equals_measure_language_model_and_the_cli(tmp_path, capsys) -> None:
    lc = script()
    lang, spec, lexicon = language()
    tokenizer = lc.build_tokenizer(lexicon)
    model = lc.new_model(16, 1, len(tokenizer), SEQ_LEN, tokenizer.eos_token_id).eval()
    folder, val = tmp_path / "tiny", tmp_path / "val.txt"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lc.write_text(val, lang.documents(spec, lexicon, 12, seed=2))

    got = lc.measure_checkpoint(folder, val, SEQ_LEN, BATCH, MIN_COUNT)

    def batches():
        return text_batches(text_documents(f"text:{val}"), tokenizer, SEQ_LEN,
                            batch_size=BATCH)

    with pytest.warns(RuntimeWarning, match="no simplex ETF"):  # C > D + 1: ETF keys NaN
        expected = measure_language_model(model, batches, min_count=MIN_COUNT,
                                          global_mean="classes", cdnv_power=1)
    assert main(["measure", "--model", f"hf:{folder}", "--dataset", f"text:{val}",
                 "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH), "--min-count",
                 str(MIN_COUNT), "--global-mean", "classes", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)  # NaN is null in JSON
    for key, value in expected.items():
        for other in (got[key], cli[key]):
            same_nan = math.isnan(value) and (other is None or math.isnan(other))
            assert same_nan or other == value, key
    # the classes: the tokens predicted at least MIN_COUNT times, counted by hand
    labels = torch.cat([b["labels"][:, 1:].flatten() for b in batches()])
    counts = Counter(labels[labels != -100].tolist())
    assert got["classes_measured"] == sum(n >= MIN_COUNT for n in counts.values()) == 72
    assert math.isfinite(got["gnc2_means"]) and math.isfinite(got["unc3"])
    assert got["ncc_agreement"] == 1 - expected["ncc_mismatch"]
    # the loss: the model's own (HF's mean over each batch's shifted labels), token-weighted
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches():
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    assert got["val_tokens"] == count == 490
    assert abs(got["val_loss"] - total / count) < 1e-5
    assert abs(got["val_loss"] - math.log(len(tokenizer))) < 0.05  # random init: ~ln V


def test_spearman_equals_scipy_with_ties() -> None:
    from scipy.stats import spearmanr

    x = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0]
    y = [2.7, 1.8, 2.8, 1.8, 2.8, 4.5, 9.0, 4.5, 2.3, 5.3]
    assert abs(script().spearman(x, y) - spearmanr(x, y)[0]) < 1e-12
    assert script().spearman(x, [-v for v in x]) == -1.0
