package storage

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
)

// pageWalkFile writes a bbolt file of the given page size whose tree has
// what the sound walk's window must cope with: many small buckets (levels
// of pages, read forward), pages freed between them (gaps), a value that
// overflows into a few pages (a span within a window) and one larger than
// a window (a span read from a mapping). It returns the file's path and
// the id of the first page of the larger value.
func pageWalkFile(t *testing.T, pageSize int) (string, uint64) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "walk.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{PageSize: pageSize})
	require.NoError(t, err)
	defer func() { require.NoError(t, db.Close()) }()
	require.NoError(t, db.Update(func(tx *bolt.Tx) error {
		root, err := tx.CreateBucket([]byte("root"))
		if err != nil {
			return err
		}
		for i := range 3000 {
			b, err := root.CreateBucket(fmt.Appendf(nil, "bucket-%05d", i))
			if err != nil {
				return err
			}
			// Large enough not to be inline: each bucket a page of its own.
			if err := b.Put([]byte("v"), bytes.Repeat([]byte{byte(i)}, pageSize/3)); err != nil {
				return err
			}
		}
		if err := root.Put([]byte("few-pages"), bytes.Repeat([]byte{'f'}, 5*pageSize)); err != nil {
			return err
		}
		return root.Put([]byte("past-a-window"), bytes.Repeat([]byte{'w'}, maxWindow+3*pageSize))
	}))
	require.NoError(t, db.Update(func(tx *bolt.Tx) error {
		root := tx.Bucket([]byte("root"))
		for i := 0; i < 3000; i += 3 {
			if err := root.DeleteBucket(fmt.Appendf(nil, "bucket-%05d", i)); err != nil {
				return err
			}
		}
		return nil
	}))
	var large uint64
	require.NoError(t, db.View(func(tx *bolt.Tx) error {
		// The page holding the large value: a leaf in use (bbolt says
		// "free" of a freed copy) with more overflow pages than a window.
		for id := 2; id < int(tx.Size())/pageSize; id++ {
			p, err := tx.Page(id)
			if err != nil {
				return err
			}
			if p != nil && p.Type == "leaf" && p.OverflowCount >= maxWindow/pageSize {
				large = uint64(id)
			}
		}
		return nil
	}))
	require.NotZero(t, large, "the large value's page")
	return path, large
}

func walkFile(t *testing.T, path string, sound bool) error {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	require.NoError(t, err)
	defer func() { require.NoError(t, db.Close()) }()
	tx, err := db.Begin(false)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback() }()
	return walkBoltPages(path, tx, sound)
}

func TestPageWalkReadsEveryLayoutOfASoundFile(t *testing.T) {
	for _, pageSize := range []int{4096, 16384, 65536} {
		t.Run(fmt.Sprintf("page=%d", pageSize), func(t *testing.T) {
			path, _ := pageWalkFile(t, pageSize)
			assert.NoError(t, walkFile(t, path, true), "sound")
			assert.NoError(t, walkFile(t, path, false), "contained")
		})
	}
}

// The control: the walk reads the pages it says it reads, the large span
// (from the mapping) and the small ones (from the window) alike.
func TestPageWalkFindsDamageInEachKindOfSpan(t *testing.T) {
	path, large := pageWalkFile(t, 4096)
	clean, err := os.ReadFile(path)
	require.NoError(t, err)
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	require.NoError(t, err)
	var last uint64
	require.NoError(t, db.View(func(tx *bolt.Tx) error {
		// The root of a bucket near the end of the keys: a page read
		// through the window, late in its level.
		last = uint64(tx.Bucket([]byte("root")).Bucket([]byte("bucket-02999")).Root())
		return nil
	}))
	require.NoError(t, db.Close())
	require.NotZero(t, last)
	damage := func(t *testing.T, page uint64, at int, b byte) {
		data := bytes.Clone(clean)
		data[page*4096+uint64(at)] = b
		require.NoError(t, os.WriteFile(path, data, 0o600))
	}
	t.Run("the id of the page past a window", func(t *testing.T) {
		damage(t, large, 0, byte(large+1))
		assert.ErrorIs(t, walkFile(t, path, true), ErrCorrupt)
	})
	t.Run("the element count of the last page in use", func(t *testing.T) {
		damage(t, last, 10, 0xff) // count: its elements now reach past the page
		assert.ErrorIs(t, walkFile(t, path, true), ErrCorrupt)
	})
}

// nestedInlineFile is a file whose page 2 (with overflow pages enough)
// holds a chain of inline buckets, each inside the one before, levels of
// them: more than one is what bbolt never writes. 48 bytes a level.
func nestedInlineFile(levels int) []byte {
	const pageSize = 4096
	pages := 4 + (levels*48)/pageSize
	data := make([]byte, pages*pageSize)
	le := binary.LittleEndian
	at := 2 * pageSize
	le.PutUint64(data[at:], 2)                  // page id
	le.PutUint32(data[at+12:], uint32(pages-3)) // overflow: to the file's end
	for level := 0; level <= levels; level++ {
		// A page header (the file page's, then each inline page's) and
		// one leaf element whose value runs to the file's end: a bucket
		// (header, root 0: inline, its page follows) but for the last.
		le.PutUint16(data[at+8:], boltLeafFlag)
		le.PutUint16(data[at+10:], 1)
		e := at + boltPageHeaderSize
		if level < levels {
			le.PutUint32(data[e:], boltBucketLeafFlag)
		}
		le.PutUint32(data[e+4:], boltElementSize) // the key (empty) follows the element
		le.PutUint32(data[e+12:], uint32(len(data)-(e+boltElementSize)))
		at = e + boltElementSize + boltBucketHeaderSize
	}
	return data
}

func walkBytes(data []byte, sound bool) error {
	w := pageWalk{src: mappedFile(data), pageSize: 4096, pages: uint64(len(data)) / 4096, sound: sound}
	w.state = make([]walkState, w.pages)
	if err := w.tree(2); err != nil {
		return err
	}
	return w.levels()
}

func TestPageWalkBoundsInlineBucketsInsideInlineBuckets(t *testing.T) {
	assert.NoError(t, walkBytes(nestedInlineFile(1), true), "control: one inline bucket is as bbolt writes it")
	assert.ErrorIs(t, walkBytes(nestedInlineFile(2), true), ErrCorrupt, "sound: bbolt never writes one inside another")
	assert.NoError(t, walkBytes(nestedInlineFile(maxInlineNesting), false), "contained: bbolt stays within the file")
	// Deep enough to overflow the stack without the bound (a walk
	// recursing per level); refused, and the test process lives.
	assert.ErrorIs(t, walkBytes(nestedInlineFile(4_000_000), false), ErrCorrupt)
}

// A read of the pages that fails (here: the file cut short after it was
// opened) is damage, as a fault under a mapping is, in the window and in
// a span read from the mapping alike.
func TestFileWindowReadThatFailsIsDamage(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cut.db")
	require.NoError(t, os.WriteFile(path, make([]byte, 4*maxWindow), 0o600))
	fw, err := openFileWindow(path, 4096)
	require.NoError(t, err)
	defer fw.close()
	_, err = fw.read(0, 4096)
	require.NoError(t, err, "control: the file is whole")
	require.NoError(t, os.Truncate(path, maxWindow))
	_, err = fw.read(2*maxWindow, 4096)
	assert.ErrorIs(t, err, ErrDamaged, "the window")
	_, err = fw.read(2*maxWindow, 2*maxWindow)
	assert.ErrorIs(t, err, ErrDamaged, "a span past a window")
}
