"""lightning_weakseg.losses"""
