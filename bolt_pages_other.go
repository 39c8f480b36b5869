//go:build !unix

package storage

import (
	"errors"
	"io"
	"os"
)

// mapFile reads the file at path whole where there is no mmap of ours.
func mapFile(path string) (data []byte, unmap func(), err error) {
	data, err = os.ReadFile(path)
	return data, func() {}, err
}

// mapOpenFile is mapFile of a file open already.
func mapOpenFile(f *os.File) (data []byte, unmap func(), err error) {
	st, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	data = make([]byte, st.Size())
	n, err := f.ReadAt(data, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, nil, err
	}
	return data[:n], func() {}, nil
}
