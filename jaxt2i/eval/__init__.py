"""Evaluation on the shapes world: `detector` reads shapes-world images back into objects and
scores how well an image matches its prompt (colour, shape, size, count, relation,
background); `evaluate` samples a cascade on held-out prompts and scores its images (the
command: `python -m jaxt2i.eval`)."""
