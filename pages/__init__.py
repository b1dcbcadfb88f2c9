"""pages: the file-system seam, page format, shadow-paged page file, buffer
pool, B+tree and rollback segment storage."""
