"""lightning_weakseg.regimes"""
