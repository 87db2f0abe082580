"""The files of a run: run and checkpoint manifests, complete-checkpoint markers and the output-directory guard
(``checkpoint``), exact tensor checksums (``checksum``) and the weight files a folder holds (``weights``).

May import: errors.
"""
