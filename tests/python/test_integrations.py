"""DropMuon under the trainers people use: Hugging Face Trainer (a tiny GPT-2, activation
checkpointing, dropmuon.integrations.DropMuonCallback, resume from a Trainer checkpoint) and
PyTorch Lightning (configure_optimizers returning DropMuon, resume from a Lightning checkpoint).
Everything is built locally from configs: nothing is downloaded."""

import warnings

import pytest
import torch
from torch import nn

import dropmuon
from dropmuon import TruncationDefeatedWarning

transformers = pytest.importorskip("transformers")
lightning = pytest.importorskip("lightning")

from dropmuon.integrations import DropMuonCallback  # noqa: E402

VOCAB, LENGTH = 64, 16


class TokenData(torch.utils.data.Dataset):
    """Random token sequences (a fixed generator), labels = inputs: causal LM."""

    def __init__(self, n=48):
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=g)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2
    )
    return transformers.GPT2LMHeadModel(config)


def hf_trainer(model, output_dir, callbacks, max_steps=6, **args):
    optimizer = dropmuon.DropMuon(
        model, lr=0.02, fallback="adamw", adamw_lr=1e-3, sampling="epoch_shift", seed=3
    )
    arguments = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_steps=3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        activation_checkpointing=True,
        **args,
    )
    return transformers.Trainer(
        model=model,
        args=arguments,
        train_dataset=TokenData(),
        optimizers=(optimizer, None),
        callbacks=callbacks,
    ), optimizer


def record_first_block_inputs(model):
    """(does the first transformer block's input require grad, are both embeddings (token and
    position) frozen) per forward."""
    seen = []
    embeddings = (model.transformer.wte.weight, model.transformer.wpe.weight)

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden.requires_grad, not any(p.requires_grad for p in embeddings)))

    model.transformer.h[0].register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_hf_trainer_keeps_truncation_under_activation_checkpointing(tmp_path):
    model = tiny_gpt2()
    seen = record_first_block_inputs(model)
    trainer, opt = hf_trainer(model, tmp_path, [])
    callback = DropMuonCallback().attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationDefeatedWarning)
        trainer.train()
    assert model.is_activation_checkpointing
    # With the embeddings frozen, the first block's input does not require grad: the backward
    # stops above them (without the callback, enable_input_require_grads makes it require grad).
    frozen_embedding_steps = [needs_grad for needs_grad, frozen in seen if frozen]
    assert frozen_embedding_steps and not any(frozen_embedding_steps)
    assert opt.step_count == 6 and len(callback.cutoffs) == 6
    logged = [entry for entry in trainer.state.log_history if "dropmuon/cutoff" in entry]
    assert logged and any(key.startswith("dropmuon/updates/") for key in logged[-1])
    # epoch_shift got its progress from the Trainer: the sampler's progress moved.
    assert opt.sampler.progress_value > 0


def test_without_the_callback_dropmuon_says_truncation_is_defeated(tmp_path):
    model = tiny_gpt2()
    seen = record_first_block_inputs(model)
    trainer, _ = hf_trainer(model, tmp_path, [], max_steps=4)
    with pytest.warns(TruncationDefeatedWarning, match="enable_input_require_grads"):
        trainer.train()
    assert any(needs_grad for needs_grad, frozen in seen if frozen)


def test_hf_trainer_resumes_the_cutoff_sequence(tmp_path):
    callback = DropMuonCallback()
    trainer, _ = hf_trainer(tiny_gpt2(), tmp_path / "full", [callback])
    trainer.train()
    full = list(callback.cutoffs)

    resumed_callback = DropMuonCallback()
    trainer, opt = hf_trainer(tiny_gpt2(), tmp_path / "full", [resumed_callback])
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed_callback.cutoffs == full[3:]
    assert opt.step_count == 6
    assert len(set(full)) > 1  # the sequence has something to reproduce


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


class LitNet(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
        )
        self.cutoffs = []

    def training_step(self, batch, batch_index):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_train_batch_start(self, batch, batch_index):
        self.cutoffs.append(self.optimizers().optimizer.cutoff)

    def configure_optimizers(self):
        return dropmuon.DropMuon(self.net, lr=0.02, fallback="adamw", seed=5)


def lit_data():
    """Three batches an epoch, so that the step-3 checkpoint is an epoch's end (Lightning's
    plain dataloaders restart their epoch on resume)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 8, generator=g), torch.randint(0, 3, (24,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def lit_trainer(root, max_steps=6):
    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=str(root), every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    return lightning.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoints],
        default_root_dir=str(root),
    )


def test_lightning_trains_and_resumes_the_cutoff_sequence(tmp_path):
    full = LitNet()
    lit_trainer(tmp_path).fit(full, lit_data())
    opt = full.optimizers().optimizer
    assert isinstance(opt, dropmuon.DropMuon) and opt.step_count == 6
    assert sum(opt.update_counts) > opt.num_layers  # some layers were updated more than once

    resumed = LitNet()
    lit_trainer(tmp_path / "again").fit(
        resumed, lit_data(), ckpt_path=str(tmp_path / "step=3.ckpt")
    )
    assert resumed.cutoffs == full.cutoffs[3:]
    assert resumed.optimizers().optimizer.update_counts == opt.update_counts
    for a, b in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
