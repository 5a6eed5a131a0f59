"""Knowledge distillation: losses and the nested (teacher once, students per budget) step."""
