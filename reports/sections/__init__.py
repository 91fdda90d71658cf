"""The report's content: one module per kind of section, each building document parts
(``reports.document``) from the runs and saying nothing about markup. ``reports.build``
assembles them in page order."""
