"""Research experiments run from the repository root (``python -m experiments.<name>``): not part of the installed
``mgpo_kernels`` package, not in its wheel or sdist.  They import the package (and its ``mgpo_kernels.bench``
helpers) like any user would."""
