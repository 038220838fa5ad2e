"""The profiler report: run MLP variants under torch.profiler (``run``), read Chrome traces
(``trace``), decode kernel names (``decode``), guess the kernels first (``expect``), summarise
(``analyze``) and show the result in the terminal (``show``) and as one HTML page (``html``)."""
