"""Evaluation: `shapes_eval` reads shapes-world images back into objects and scores how
well an image matches its prompt (colour, shape, size, count, relation, background)."""
