//go:build unix

package storage

import (
	"os"

	"golang.org/x/sys/unix"
)

// mapFile maps the file at path for reading, shared, so that it shows
// what bbolt's own map shows, without copying it; unmap releases it.
func mapFile(path string) (data []byte, unmap func(), err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	return mapOpenFile(f)
}

// mapOpenFile is mapFile of a file open already; the mapping outlives f.
func mapOpenFile(f *os.File) (data []byte, unmap func(), err error) {
	st, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	if st.Size() == 0 {
		return nil, func() {}, nil
	}
	data, err = unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, nil, err
	}
	return data, func() { _ = unix.Munmap(data) }, nil
}
