//go:build !unix

package storage

import "os"

// mapFile reads the file at path whole where there is no mmap of ours.
func mapFile(path string) (data []byte, unmap func(), err error) {
	data, err = os.ReadFile(path)
	return data, func() {}, err
}
