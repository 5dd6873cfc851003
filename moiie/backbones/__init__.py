"""Vision encoders and LLM backbones (registered in ``moiie.VISION_ENCODERS`` / ``moiie.LLM_BACKBONES``)."""
