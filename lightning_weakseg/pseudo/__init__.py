"""lightning_weakseg.pseudo"""
