"""ELECTRA pre-training: a quarter-size generator sharing the embeddings, labels that call a
correctly sampled token original, no gradient through the sampling, a discriminator that learns,
and a checkpoint that is the discriminator while the run still resumes exactly."""

import pytest
import torch
from test_masking import repeated_word_corpus

import qkv
from qkv.config import ModelConfig
from qkv.errors import UsageError
from qkv.models import Encoder, ModelOutput
from qkv.tokenizer import train_tokenizer
from qkv.training import (
    BlockLoader,
    MaskedLMCollator,
    ReplacedTokenDetection,
    Trainer,
    TrainingConfig,
    generator_config,
    replaced_token_accuracy,
    split_blocks,
)
from qkv.training.electra import all_original_accuracy

VOCAB, MASK, SPECIAL = 120, 4, (0, 1, 2, 3, 4)


def electra(seed: int = 0, **overrides) -> ReplacedTokenDetection:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny-bert", vocab_size=VOCAB, head="rtd", max_seq_len=32, **overrides)
    return ReplacedTokenDetection(Encoder(cfg), Encoder(generator_config(cfg)))


@pytest.fixture
def batch():
    blocks = torch.randint(5, VOCAB, (4, 15), generator=torch.Generator().manual_seed(0))
    return MaskedLMCollator(VOCAB, MASK, SPECIAL, 0, cls_id=2, mask_prob=0.3, seed=0)(blocks)


def test_generator_is_a_quarter_of_the_discriminator():
    disc = ModelConfig.from_name("electra-small")
    gen = generator_config(disc)
    assert (gen.d_model, gen.d_ff, gen.n_heads, gen.head_dim) == (64, 256, 1, 64)  # ELECTRA-Small's generator
    assert (gen.n_layers, gen.embedding_size, gen.head, gen.vocab_size) == (12, 128, "mlm", disc.vocab_size)
    with pytest.raises(UsageError, match="size"):
        generator_config(disc, 0.0)


def test_embeddings_are_shared_and_the_mlm_head_stays_tied():
    model = electra()
    d, g = model.discriminator.embed, model.generator.embed
    for name in ("tokens", "positions", "token_types", "norm"):
        assert getattr(g, name) is getattr(d, name)
    assert g.project is not d.project  # each model projects the shared embeddings to its own width
    assert model.generator.head.decoder.weight is d.tokens.weight
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("generator.embed.tokens") for n in names)  # trained once, through both
    with pytest.raises(UsageError, match="share embeddings"):
        cfg = ModelConfig.from_name("tiny-bert", vocab_size=VOCAB, head="rtd")
        ReplacedTokenDetection(Encoder(cfg), Encoder(generator_config(cfg).replace(vocab_size=VOCAB + 1)))


def generator_that_predicts(model: ReplacedTokenDetection, token: torch.Tensor | int) -> None:
    """Make the generator put all its mass on `token` ([B, T] ids, or one id everywhere)."""
    real = model.generator.forward

    def forward(input_ids, attention_mask=None, token_type_ids=None, labels=None):
        out = real(input_ids, attention_mask, token_type_ids, labels=labels)
        target = token if torch.is_tensor(token) else torch.full_like(input_ids, token)
        logits = torch.full_like(out.logits, -1e4).scatter(-1, target[..., None].clamp(min=0), 1e4)
        return ModelOutput(last_hidden_state=out.last_hidden_state, logits=logits, loss=out.loss)

    model.generator.forward = forward


def test_a_correctly_sampled_token_counts_as_original(batch):
    model = electra()
    generator_that_predicts(model, batch["labels"])  # always samples the original
    out = model(**batch)
    assert not out.replaced.any()

    model = electra()
    generator_that_predicts(model, 7)  # always samples id 7
    out = model(**batch)
    chosen = batch["labels"] != -100
    assert torch.equal(out.replaced.bool(), chosen & (batch["labels"] != 7))
    assert out.logits.shape == batch["input_ids"].shape
    assert torch.allclose(out.loss, out.generator_loss + 50 * out.discriminator_loss)


def test_no_gradient_flows_through_the_sampling(batch):
    model = electra()
    torch.manual_seed(1)
    model(**batch).loss.backward()
    joint = {n: p.grad.clone() for n, p in model.generator.named_parameters() if n.startswith("blocks.")}
    model.zero_grad()
    model.generator(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss.backward()
    for name, grad in joint.items():  # the generator's own weights learn from its MLM loss alone
        assert torch.allclose(grad, dict(model.generator.named_parameters())[name].grad, atol=1e-6), name


@pytest.mark.parametrize(
    "mask_prob, steps",
    [
        # At 30% masking (ELECTRA-Large used 25%) twice as many replacements per step teach faster.
        pytest.param(0.3, 300, id="30%-masked"),
        pytest.param(0.15, 1200, id="15%-masked", marks=pytest.mark.slow),
    ],
)
def test_discriminator_beats_the_all_original_baseline(mask_prob, steps):
    # Lines of one repeated word: a replaced token differs from its neighbours, which the
    # discriminator learns to see while the small generator (held back by λ = 50) is still poor.
    lines = repeated_word_corpus()
    tok = train_tokenizer(kind="wordpiece", texts=lines, vocab_size=VOCAB, show_progress=False)
    stream = torch.tensor([i for line in lines for i in tok.encode(line, add_special_tokens=False)])
    corpus = split_blocks(stream, 15, val_fraction=0.25)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-bert", vocab_size=tok.vocab_size, head="rtd", max_seq_len=32)
    model = ReplacedTokenDetection(Encoder(cfg), Encoder(generator_config(cfg)))
    masker = MaskedLMCollator.from_tokenizer(tok, mask_prob=mask_prob, seed=0)
    config = TrainingConfig(steps=steps, lr=3e-3, warmup_steps=10, weight_decay=0.01, progress=False)
    Trainer(model, config, BlockLoader(corpus.train, 16), collate=masker).train()

    model.eval()
    batch = masker.fixed()(corpus.val)
    with torch.no_grad():
        out = model(**batch)
    right, n = replaced_token_accuracy(batch, out)
    baseline, _ = all_original_accuracy(batch, out)
    assert n == batch["attention_mask"].sum() and baseline < n  # some tokens were replaced
    assert right - baseline > 4 * (n * 0.1) ** 0.5  # well past the sampling noise of either count


def test_checkpoint_is_the_discriminator_and_the_run_resumes_exactly(tmp_path):
    blocks = torch.randint(5, VOCAB, (24, 15), generator=torch.Generator().manual_seed(0))

    def run(out, until=None, resume=False):
        masker = MaskedLMCollator(VOCAB, MASK, SPECIAL, 0, cls_id=2, seed=0)
        config = TrainingConfig(steps=6, lr=3e-3, save_every=3, eval_every=3, out_dir=str(out), progress=False)
        loader = BlockLoader(blocks[:20], 4, seed=0)
        options = {"eval_collate": masker.fixed(), "accuracy": replaced_token_accuracy}
        if resume:
            torch.manual_seed(1234)  # a new process starts from other RNG states
            model = ReplacedTokenDetection.from_checkpoint(out / "checkpoint")
            trainer = Trainer.from_checkpoint(out / "checkpoint", loader, blocks[20:], masker, model=model, **options)
        else:
            trainer = Trainer(electra(dropout=0.1), config, loader, blocks[20:], masker, **options)
        trainer.train(until=until)
        return trainer

    expected = values(run(tmp_path / "a").history)
    first = run(tmp_path / "b", until=4)  # checkpoint at step 3 (after its evaluation), then "killed" in step 4
    resumed = run(tmp_path / "b", resume=True)
    assert values(first.history[:4] + resumed.history) == expected

    loaded = qkv.load(tmp_path / "b" / "checkpoint")
    assert isinstance(loaded, Encoder) and loaded.config.head == "rtd"
    for name, tensor in resumed.model.discriminator.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with pytest.raises(UsageError, match="ELECTRA generator"):
        ReplacedTokenDetection.from_checkpoint(save_without_generator(tmp_path / "plain"))


def values(records: list[dict]) -> list[tuple]:
    """What a resumed run must reproduce: every loss and accuracy, step by step (not the timings)."""
    return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("eval_accuracy")) for r in records]


def save_without_generator(path):
    """A checkpoint with training state but no generator in it (a plain MLM run's)."""
    blocks = torch.randint(5, VOCAB, (8, 15), generator=torch.Generator().manual_seed(0))
    model = Encoder(ModelConfig.from_name("tiny-bert", vocab_size=VOCAB, head="mlm", max_seq_len=32))
    masker = MaskedLMCollator(VOCAB, MASK, SPECIAL, 0, cls_id=2)
    Trainer(model, TrainingConfig(steps=1, out_dir=str(path), progress=False), BlockLoader(blocks, 4), None,
            masker).train()  # fmt: skip
    return path / "checkpoint"
