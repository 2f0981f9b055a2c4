"""The Astrea model: heterogeneous vision experts, adapters, router and fusion."""
