"""lightning_weakseg.callbacks"""
