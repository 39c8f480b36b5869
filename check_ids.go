package storage

import (
	"bufio"
	"container/heap"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
)

// createIDSpill makes the temporary file IDs are spilled to; tests replace
// it to make the file fail.
var createIDSpill = func() (*os.File, error) { return os.CreateTemp("", "snapmeta-check-ids-*") }

// idSpill finds the IDs that more than one record holds, in memory bounded
// by a run: IDs are gathered in runs of idRunLen, each sorted and written
// to a temporary file (removed on close) when it fills; the last run, in
// memory, and the written ones are then merged.
type idSpill struct {
	run  []uint64
	file *os.File
	ends []int64 // where each spilled run ends in file
}

func (s *idSpill) add(id uint64) error {
	s.run = append(s.run, id)
	if len(s.run) < idRunLen {
		return nil
	}
	return s.spill()
}

// spill writes the run in memory to the file, sorted.
func (s *idSpill) spill() error {
	if s.file == nil {
		f, err := createIDSpill()
		if err != nil {
			return fmt.Errorf("check: a temporary file for the store's IDs: %w", fileErr(err))
		}
		s.file = f
	}
	slices.Sort(s.run)
	w := bufio.NewWriterSize(s.file, 64<<10)
	var b [8]byte
	for _, id := range s.run {
		binary.BigEndian.PutUint64(b[:], id)
		_, _ = w.Write(b[:]) // a write error stays in w and Flush returns it
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("check: spilling the store's IDs to %s: %w", s.file.Name(), fileErr(err))
	}
	end := int64(0)
	if len(s.ends) > 0 {
		end = s.ends[len(s.ends)-1]
	}
	s.ends = append(s.ends, end+int64(8*len(s.run)))
	s.run = s.run[:0]
	return nil
}

// shared returns, in order, each ID that was added more than once.
func (s *idSpill) shared() ([]uint64, error) {
	slices.Sort(s.run)
	runs := idRuns{&memoryRun{ids: s.run}}
	start := int64(0)
	for _, end := range s.ends {
		r := bufio.NewReaderSize(io.NewSectionReader(s.file, start, end-start), 4<<10)
		runs = append(runs, &fileRun{r: r})
		start = end
	}
	for i := 0; i < len(runs); {
		if ok, err := runs[i].advance(); err != nil {
			return nil, err
		} else if !ok {
			runs = slices.Delete(runs, i, i+1)
			continue
		}
		i++
	}
	heap.Init(&runs)
	var out []uint64
	var last uint64
	seen := false
	for len(runs) > 0 {
		id := runs[0].head()
		if seen && id == last && (len(out) == 0 || out[len(out)-1] != id) {
			out = append(out, id)
		}
		last, seen = id, true
		ok, err := runs[0].advance()
		if err != nil {
			return nil, err
		}
		if ok {
			heap.Fix(&runs, 0)
		} else {
			heap.Pop(&runs)
		}
	}
	return out, nil
}

// close removes the temporary file, if there is one.
func (s *idSpill) close() {
	if s.file != nil {
		name := s.file.Name()
		_ = s.file.Close()
		_ = os.Remove(name)
		s.file = nil
	}
}

// idRun is one sorted run of IDs being merged.
type idRun interface {
	head() uint64
	// advance moves to the next ID; false once the run is spent.
	advance() (bool, error)
}

type memoryRun struct {
	ids []uint64
	at  int // the head's index plus one; 0 before the first advance
}

func (m *memoryRun) head() uint64 { return m.ids[m.at-1] }

func (m *memoryRun) advance() (bool, error) {
	m.at++
	return m.at <= len(m.ids), nil
}

type fileRun struct {
	r  *bufio.Reader
	id uint64
}

func (f *fileRun) head() uint64 { return f.id }

func (f *fileRun) advance() (bool, error) {
	var b [8]byte
	switch _, err := io.ReadFull(f.r, b[:]); {
	case errors.Is(err, io.EOF):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("check: reading back the store's IDs: %w", fileErr(err))
	}
	f.id = binary.BigEndian.Uint64(b[:])
	return true, nil
}

// idRuns is a min-heap of runs by their heads.
type idRuns []idRun

func (h idRuns) Len() int           { return len(h) }
func (h idRuns) Less(i, j int) bool { return h[i].head() < h[j].head() }
func (h idRuns) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *idRuns) Push(x any)        { *h = append(*h, x.(idRun)) }
func (h *idRuns) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}
