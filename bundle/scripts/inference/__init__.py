"""An inference run: its inputs (folders, DICOM series, BIDS), its cases (crops streamed, heads one by one) and what it writes beside the masks."""
