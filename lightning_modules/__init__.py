"""LightningModules of recap-suite. They wire plain networks from ``components`` to data, losses and logging; this
package imports nothing, so ``evaluation`` and ``components`` can be used (by reports, notebooks) without Lightning."""
