"""The Tideflow edge agent: runs assigned workflows durably at one site.

``store`` is the SQLite memory (and the only SQL), ``executor`` the DAG
scheduler, ``runner`` the process launcher, ``cli`` the ``tideflow-agent``
command.  The link to the cloud (``link``, ``sync``) feeds the executor but the
executor never waits on it.  This package imports ``tideflow`` and never the
operator.
"""
