"""The operator's HTTP side: a live web view of the gateway (``view``), its HTTP Basic
authentication (``auth``) and the pictures and tables it serves (``charts``, ``reports``)."""
