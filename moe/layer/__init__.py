"""The MoE layer, the research surface: its config, routing (which token goes to which expert,
in which slot), dispatch strategies (one semantics, several implementations), the Linen modules
and expert parallelism. Imports nothing of the project but `moe.errors`, `moe.sharding` and
`moe.trees` (tests/test_architecture.py checks it)."""
