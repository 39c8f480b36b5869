package storage

import (
	"fmt"
	"io"
	"os"
)

// pageSource gives the page walk the file's bytes.
type pageSource interface {
	// read returns the n bytes at off, which the walk has checked lie
	// within the file. They stay valid while the walk reads within the
	// span of the last read that began a page's span (page reads a
	// page's whole span first): the walk holds a page's element table
	// while it reads the keys and values after it. A read that fails is
	// damage (ErrDamaged), as a fault under a mapping is.
	read(off, n uint64) ([]byte, error)
	// size is the file's size in bytes.
	size() uint64
	// plan tells what the walk reads next: these pages, in this order.
	plan(ahead []uint64)
	close()
}

// mappedFile is the whole file in memory (mapFile).
type mappedFile []byte

func (m mappedFile) read(off, n uint64) ([]byte, error) { return m[off : off+n], nil }
func (m mappedFile) size() uint64                       { return uint64(len(m)) }
func (mappedFile) plan([]uint64)                        {}
func (mappedFile) close()                               {}

// Window sizes: a read covers the pages planned next as long as the gap
// before each is at most maxWindowGap (copying a gap costs less than
// another read) and the window at most maxWindow.
const (
	maxWindow    = 1 << 20
	maxWindowGap = 64 << 10
)

// fileWindow reads the file forward in large pieces, as the plan says
// (the sound walk's levels are in file order). A read larger than a
// window (a page with many overflow pages) is served from a mapping
// instead, and so are later reads within its span that the window does
// not hold, so that the window is never reloaded under it. Memory stays
// bounded by a window or a page, whichever is larger (where there is no
// mmap, mapFile reads the file whole for such a span).
type fileWindow struct {
	f        *os.File
	pageSize uint64
	fileSize uint64
	buf      []byte // the window: the file's bytes from at
	at       uint64
	ahead    []uint64
	mapped   []byte // mapped on the first large read
	unmap    func()
	// bigAt and bigEnd are the span of the last large read, whose reads
	// are served from the mapping.
	bigAt, bigEnd uint64
}

func openFileWindow(path string, pageSize uint64) (*fileWindow, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	return &fileWindow{f: f, pageSize: pageSize, fileSize: uint64(st.Size())}, nil
}

func (fw *fileWindow) size() uint64        { return fw.fileSize }
func (fw *fileWindow) plan(ahead []uint64) { fw.ahead = ahead }

func (fw *fileWindow) close() {
	if fw.unmap != nil {
		fw.unmap()
	}
	_ = fw.f.Close()
}

func (fw *fileWindow) read(off, n uint64) ([]byte, error) {
	if off >= fw.at && off+n <= fw.at+uint64(len(fw.buf)) {
		return fw.buf[off-fw.at : off-fw.at+n], nil
	}
	if fw.mapped != nil && off >= fw.bigAt && off+n <= fw.bigEnd {
		return fw.mapped[off : off+n], nil
	}
	if n > maxWindow {
		if fw.mapped == nil {
			data, unmap, err := mapOpenFile(fw.f)
			if err != nil {
				return nil, fmt.Errorf("reading %s: %w", fw.f.Name(), boltErr(err))
			}
			fw.mapped, fw.unmap = data, unmap
		}
		if off+n > uint64(len(fw.mapped)) { // the file shrank since it was opened
			return nil, fw.readErr(off, n, io.ErrUnexpectedEOF)
		}
		// What the walk reads next within this span comes from the mapping
		// too: a window read would clobber what it holds of it.
		fw.bigAt, fw.bigEnd = off, off+n
		return fw.mapped[off : off+n], nil
	}
	end := off + max(n, fw.pageSize)
	for _, id := range fw.ahead {
		base := id * fw.pageSize
		if base < end {
			continue
		}
		if base-end > maxWindowGap || base+fw.pageSize-off > maxWindow {
			break
		}
		end = base + fw.pageSize
	}
	end = min(end, fw.fileSize)
	if uint64(cap(fw.buf)) < end-off { // once, or for pages larger than a window
		fw.buf = make([]byte, 0, max(maxWindow, end-off))
	}
	fw.buf, fw.at = fw.buf[:end-off], off
	if _, err := fw.f.ReadAt(fw.buf, int64(off)); err != nil {
		fw.buf = fw.buf[:0]
		return nil, fw.readErr(off, end-off, err)
	}
	return fw.buf[:n], nil
}

// readErr is a read of the file's pages that failed: damage, as a fault
// under a mapping is (a disk's read error, a file cut short).
func (fw *fileWindow) readErr(off, n uint64, err error) error {
	return fmt.Errorf("reading %s: %d bytes at byte %d: %v: %w", fw.f.Name(), n, off, err, ErrDamaged)
}
