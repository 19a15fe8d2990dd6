"""Token samples of tiny Hugging Face language models against hand-built references and
the models' own losses (float64 models, so agreement is to rounding)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from nctools.models.tokens import (
    IGNORE_INDEX,
    LMHeadInput,
    lm_head,
    lm_task,
    lm_token_samples,
    token_samples,
)

VOCAB = 100


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).double().eval()


@pytest.fixture(scope="module")
def bert() -> BertForMaskedLM:
    torch.manual_seed(1)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=16)
    return BertForMaskedLM(config).double().eval()


def right_padded() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (3, 8), generator=gen)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0  # row 1 has 5 real tokens, row 2 has 3
    mask[2, 3:] = 0
    return ids, mask


def test_task_read_from_the_model_class(gpt2, bert) -> None:
    config = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=1, intermediate_size=8)
    assert (lm_task(gpt2), lm_task(bert)) == ("causal", "masked")
    assert lm_task(BertForSequenceClassification(config)) is None


def test_lm_head_is_the_tied_embedding_or_the_decoder(gpt2, bert) -> None:
    weight, bias = lm_head(gpt2)
    assert bias is None and weight.shape == (VOCAB, 32)
    assert torch.equal(weight, gpt2.transformer.wte.weight)  # tied to the input embedding
    weight, bias = lm_head(bert)
    assert torch.equal(weight, bert.cls.predictions.decoder.weight)
    assert bias is not None and torch.equal(bias, bert.cls.predictions.decoder.bias)


def test_causal_samples_equal_the_shifted_hidden_states(gpt2) -> None:
    ids, mask = right_padded()
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, 2] = IGNORE_INDEX  # an ignored label inside a row
    with torch.no_grad():
        out = gpt2(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    kept = [(b, t) for b in range(3) for t in range(7)  # position t predicts t + 1
            if mask[b, t] and mask[b, t + 1] and labels[b, t + 1] != IGNORE_INDEX]
    assert len(kept) == 7 + 4 + 2 - 1
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": labels}]
    ((features, got),) = list(lm_token_samples(gpt2, batches))
    assert got.tolist() == [int(ids[b, t + 1]) for b, t in kept]
    assert torch.allclose(features, torch.stack([hidden[b, t] for b, t in kept]),
                          rtol=0, atol=1e-10)
    weight, bias = lm_head(gpt2)
    assert bias is None
    logits = features @ weight.T
    assert torch.allclose(logits, torch.stack([out.logits[b, t] for b, t in kept]),
                          rtol=0, atol=1e-10)
    # Hugging Face's causal loss casts the logits to float32 (a float64 model included),
    # so the model's own loss agrees to float32 rounding; an unpaired or missing token
    # would move it by ~1e-1
    loss = F.cross_entropy(logits, got)
    assert out.loss.dtype == torch.float32
    assert abs(float(loss) - float(out.loss)) < 1e-6
    assert abs(float(F.cross_entropy(logits.float(), got)) - float(out.loss)) < 1e-6


def test_left_padding_drops_the_pad_positions(gpt2) -> None:
    ids, _ = right_padded()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: positions 0-2 hidden, position 2 would predict token 3
    with torch.no_grad():
        hidden = gpt2(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    features, labels = token_samples(hidden.hidden_states[-1], ids, "causal", mask)
    assert labels.tolist() == ids[0, 4:].tolist() + ids[1, 1:].tolist() + ids[2, 1:].tolist()
    assert torch.equal(features[0], hidden.hidden_states[-1][0, 3])


def test_masked_samples_are_the_masked_positions(bert) -> None:
    ids, mask = right_padded()
    labels = torch.full_like(ids, IGNORE_INDEX)
    chosen = [(0, 1), (0, 6), (1, 0), (1, 4), (2, 2)]
    inputs = ids.clone()
    for b, t in chosen:
        labels[b, t] = ids[b, t]
        inputs[b, t] = 3  # the mask token of this vocabulary
    with torch.no_grad():
        out = bert(input_ids=inputs, attention_mask=mask, labels=labels,
                   output_hidden_states=True)
        # BERT's head input is its transform (dense, GELU, LayerNorm) of the last layer
        head_input = bert.cls.predictions.transform(out.hidden_states[-1])
    batches = [{"input_ids": inputs, "attention_mask": mask, "labels": labels}]
    ((features, got),) = list(lm_token_samples(bert, batches))
    assert got.tolist() == [int(ids[b, t]) for b, t in chosen]
    want = torch.stack([head_input[b, t] for b, t in chosen])
    assert torch.allclose(features, want, rtol=0, atol=1e-10)
    weight, bias = lm_head(bert)
    loss = F.cross_entropy(features @ weight.T + bias, got)
    assert abs(float(loss) - float(out.loss)) < 1e-10


def test_samples_over_batches_equal_one_batch(gpt2) -> None:
    ids, mask = right_padded()
    whole = list(lm_token_samples(gpt2, [{"input_ids": ids, "attention_mask": mask}]))
    split = list(lm_token_samples(gpt2, [{"input_ids": ids[i:i + 1], "attention_mask":
                                          mask[i:i + 1]} for i in range(3)]))
    assert torch.equal(torch.cat([s[1] for s in split]), whole[0][1])
    assert torch.allclose(torch.cat([s[0] for s in split]), whole[0][0], rtol=0, atol=1e-12)


def test_bad_inputs_are_named(gpt2, bert) -> None:
    ids, _ = right_padded()
    with pytest.raises(ValueError, match="labels: a masked LM needs labels"):
        token_samples(torch.zeros(3, 8, 4), ids, "masked")
    with pytest.raises(ValueError, match=r"hidden: shape \(3, 7, 4\) does not match"):
        token_samples(torch.zeros(3, 7, 4), ids, "causal")
    with pytest.raises(ValueError, match="the LM head did not run"), LMHeadInput(gpt2) as hook:
        hook.take()
    config = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=1, intermediate_size=8)
    with pytest.raises(ValueError, match="is not a causal or masked LM"):
        next(lm_token_samples(BertForSequenceClassification(config), []))
