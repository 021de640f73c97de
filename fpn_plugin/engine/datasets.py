"""What both training entries do with the output folder and the datasets before building."""
import logging
import os

from detectron2.utils import comm

from ..data.build import DatasetCheck, InvalidRecordsError, write_invalid_records
from ..utils.files import remove_stale_temp_files

__all__ = ["INVALID_RECORDS_FILE", "prepare_output_and_check_datasets"]

logger = logging.getLogger(__name__)

INVALID_RECORDS_FILE = "invalid_records.json"


def prepare_output_and_check_datasets(output_dir: str, validate) -> DatasetCheck:
    """
    Create ``output_dir`` and remove the partial files an interrupted run left there (main
    process), then validate the datasets with ``validate(report_path)`` (the report path on
    the main process, else None) and list every problem found in
    ``output_dir/invalid_records.json``, also when the policy refuses the run
    (``InvalidRecordsError`` is re-raised after the report is written).
    """
    main = comm.is_main_process()
    if main:
        os.makedirs(output_dir, exist_ok=True)
        for path in remove_stale_temp_files(output_dir):
            logger.info(f"Removed {path}, a partial file left by an interrupted run")
    report = os.path.join(output_dir, INVALID_RECORDS_FILE)
    try:
        check = validate(report if main else None)
    except InvalidRecordsError as e:  # the full list goes to the report the message names
        if main:
            write_invalid_records(e.problems, report)
        raise
    if check.problems and main:
        write_invalid_records(check.problems, report)
        logger.warning(f"{len(check.problems)} record(s) of the datasets were left out "
                       f"({check.num_skipped} image record(s) with problems); all are listed "
                       f"in {report}")
    return check
