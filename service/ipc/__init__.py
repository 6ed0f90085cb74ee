"""What crosses between a front-end process and the engine process: typed records
(`records`), the framed local socket they travel on (`channel`) and the shared memory that
carries the pixels (`shm`)."""
