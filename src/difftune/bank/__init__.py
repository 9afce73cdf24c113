"""The knowledge bank: samples of the frozen pre-trained model, replayed for retention."""

from difftune.bank.generate import bank_manifest, generate_bank, load_bank

__all__ = ["bank_manifest", "generate_bank", "load_bank"]
