"""The demo's trained tiny base (`raysal.demo.base`): made once, on first use, by the plain loop."""
