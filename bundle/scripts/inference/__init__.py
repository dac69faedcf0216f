"""An inference run: its inputs (folders, DICOM, BIDS), its cases, and what it writes beside the masks."""
