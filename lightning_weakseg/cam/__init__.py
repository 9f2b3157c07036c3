"""lightning_weakseg.cam"""
