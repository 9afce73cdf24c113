"""Generation on any forward process: one sampling spec (``spec``) and the generation loop (``generate``)."""
