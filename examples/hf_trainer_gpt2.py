"""DropMuon in Hugging Face's Trainer: a tiny GPT-2 (built from a config, nothing downloaded)
trained as a character-level language model on the project's own README, with activation
checkpointing, kept truncating by dropmuon.integrations.DropMuonCallback.

    python examples/hf_trainer_gpt2.py [--steps 60] [--output /tmp/dropmuon-gpt2]

Needs transformers and accelerate (requirements-dev.txt). Prints the loss and the cutoff every
10 steps; resume an interrupted run with --resume <output>/checkpoint-N.
"""

import argparse
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import dropmuon
from dropmuon.integrations import DropMuonCallback

CONTEXT = 64


class Characters(torch.utils.data.Dataset):
    """Overlapping windows of a text's bytes (a 256-symbol vocabulary)."""

    def __init__(self, text: bytes) -> None:
        self.data = torch.tensor(list(text), dtype=torch.long)

    def __len__(self) -> int:
        return (len(self.data) - 1) // CONTEXT

    def __getitem__(self, i):
        window = self.data[i * CONTEXT : (i + 1) * CONTEXT]
        return {"input_ids": window, "labels": window}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output", default="/tmp/dropmuon-gpt2")
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_bytes()
    config = GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)
    # Muon for the matrices, AdamW for biases and norm gains; epoch_shift gets its progress
    # from the Trainer through the callback.
    optimizer = dropmuon.DropMuon(
        model, lr=0.02, fallback="adamw", adamw_lr=3e-3, sampling="epoch_shift"
    )
    training = TrainingArguments(
        output_dir=args.output,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        logging_steps=10,
        save_steps=max(1, args.steps // 2),
        activation_checkpointing=True,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=Characters(text),
        optimizers=(optimizer, None),
    )
    DropMuonCallback(log_update_counts=False).attach(trainer)
    trainer.train(resume_from_checkpoint=args.resume)
    print(dropmuon.describe(optimizer).splitlines()[0])


if __name__ == "__main__":
    main()
