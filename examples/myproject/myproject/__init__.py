"""A user's project: its own model (`models.DigitNet`), task (`tasks.MixupClassify`) and shard format
(`decode.decode`), trained by pipeline without a line of pipeline's code changed."""
