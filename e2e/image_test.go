package e2e

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/stretchr/testify/require"
)

// entry is one file of a layer.
type entry struct {
	name     string
	typeflag byte   // tar.TypeReg (default), TypeDir, TypeSymlink
	mode     int64  // 0: 0644 for files, 0755 for directories
	body     []byte // a regular file's content
	bodyFrom string // or a file to copy the content from
	// size and seed make a regular file of size pseudo-random bytes.
	size int64
	seed uint64
	link string // a symlink's target
}

// layer is a layer of an image, described by its files.
type layer []entry

// image is an OCI image archive written by buildImage.
type image struct {
	dir     string          // the OCI image layout the archive holds
	path    string          // the archive, for ctr images import
	name    string          // the name ctr gives it
	diffIDs []digest.Digest // of the layers, base first
}

// chainIDs are the names of the committed snapshots an unpack makes, base
// first.
func (im image) chainIDs() []digest.Digest {
	return identity.ChainIDs(append([]digest.Digest(nil), im.diffIDs...))
}

// imageBase is the --base-name every test image is imported with; the
// archive names its manifest by tag only.
const imageBase = "docker.io/library/snapmeta-e2e"

// buildImage writes an OCI image archive (oci-layout, index.json,
// blobs/sha256/...) holding layers, each a gzipped tar, with a config whose
// diff_ids match, for this machine's platform. compress false stores the
// layers uncompressed inside gzip (fast for large random layers).
func buildImage(t *testing.T, tag string, compress bool, layers ...layer) image {
	t.Helper()
	dir := t.TempDir()
	blobs := filepath.Join(dir, "blobs", "sha256")
	require.NoError(t, os.MkdirAll(blobs, 0o755))

	var (
		diffIDs []digest.Digest
		descs   []ocispec.Descriptor
	)
	for _, l := range layers {
		diffID, desc := writeLayer(t, blobs, l, compress)
		diffIDs = append(diffIDs, diffID)
		descs = append(descs, desc)
	}
	created := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	config := ocispec.Image{
		Created:  &created,
		Platform: ocispec.Platform{Architecture: runtime.GOARCH, OS: "linux"},
		Config: ocispec.ImageConfig{
			Env:        []string{"PATH=/bin"},
			Cmd:        []string{"/bin/sh"},
			WorkingDir: "/",
		},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
	}
	configDesc := writeJSONBlob(t, blobs, ocispec.MediaTypeImageConfig, config)
	manifest := ocispec.Manifest{
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    configDesc,
		Layers:    descs,
	}
	manifest.SchemaVersion = 2
	manifestDesc := writeJSONBlob(t, blobs, ocispec.MediaTypeImageManifest, manifest)
	manifestDesc.Platform = &config.Platform
	manifestDesc.Annotations = map[string]string{ocispec.AnnotationRefName: tag}
	index := ocispec.Index{MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{manifestDesc}}
	index.SchemaVersion = 2
	writeJSON(t, filepath.Join(dir, "index.json"), index)
	writeJSON(t, filepath.Join(dir, ocispec.ImageLayoutFile), ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})

	archive := filepath.Join(t.TempDir(), tag+".tar")
	tarDir(t, dir, archive)
	return image{dir: dir, path: archive, name: imageBase + ":" + tag, diffIDs: diffIDs}
}

// writeLayer writes the gzipped tar of l into blobs, named by its digest,
// and returns its diff ID (the digest of the uncompressed tar) and
// descriptor.
func writeLayer(t *testing.T, blobs string, l layer, compress bool) (digest.Digest, ocispec.Descriptor) {
	t.Helper()
	f, err := os.CreateTemp(blobs, "layer-")
	require.NoError(t, err)
	defer f.Close()
	blobHash := sha256.New()
	counted := &countWriter{w: io.MultiWriter(f, blobHash)}
	level := gzip.BestSpeed
	if !compress {
		level = gzip.NoCompression
	}
	gz, err := gzip.NewWriterLevel(counted, level)
	require.NoError(t, err)
	diffHash := sha256.New()
	tw := tar.NewWriter(io.MultiWriter(gz, diffHash))
	mtime := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, e := range l {
		writeEntry(t, tw, e, mtime)
	}
	require.NoError(t, tw.Close())
	require.NoError(t, gz.Close())
	require.NoError(t, f.Close())
	dgst := digestOf(blobHash)
	require.NoError(t, os.Rename(f.Name(), filepath.Join(blobs, dgst.Encoded())))
	return digestOf(diffHash), ocispec.Descriptor{
		MediaType: ocispec.MediaTypeImageLayerGzip,
		Digest:    dgst,
		Size:      counted.n,
	}
}

func writeEntry(t *testing.T, tw *tar.Writer, e entry, mtime time.Time) {
	t.Helper()
	hdr := &tar.Header{Name: e.name, Typeflag: e.typeflag, Mode: e.mode, ModTime: mtime, Format: tar.FormatPAX}
	if hdr.Typeflag == 0 {
		hdr.Typeflag = tar.TypeReg
	}
	var body io.Reader
	switch hdr.Typeflag {
	case tar.TypeDir:
		if hdr.Mode == 0 {
			hdr.Mode = 0o755
		}
	case tar.TypeSymlink:
		hdr.Linkname = e.link
		hdr.Mode = 0o777
	case tar.TypeReg:
		if hdr.Mode == 0 {
			hdr.Mode = 0o644
		}
		switch {
		case e.bodyFrom != "":
			b, err := os.ReadFile(e.bodyFrom)
			require.NoError(t, err)
			body, hdr.Size = bytes.NewReader(b), int64(len(b))
		case e.size > 0:
			body, hdr.Size = io.LimitReader(rand.NewChaCha8(seed(e.seed)), e.size), e.size
		default:
			body, hdr.Size = bytes.NewReader(e.body), int64(len(e.body))
		}
	}
	require.NoError(t, tw.WriteHeader(hdr))
	if body != nil {
		_, err := io.Copy(tw, body)
		require.NoError(t, err)
	}
}

func seed(n uint64) [32]byte {
	var s [32]byte
	for i := range 8 {
		s[i] = byte(n >> (8 * i))
	}
	return s
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

func digestOf(h hash.Hash) digest.Digest {
	return digest.NewDigestFromBytes(digest.SHA256, h.Sum(nil))
}

// writeJSONBlob writes v as a blob and returns its descriptor.
func writeJSONBlob(t *testing.T, blobs, mediaType string, v any) ocispec.Descriptor {
	t.Helper()
	b, err := json.Marshal(v)
	require.NoError(t, err)
	dgst := digest.FromBytes(b)
	require.NoError(t, os.WriteFile(filepath.Join(blobs, dgst.Encoded()), b, 0o644))
	return ocispec.Descriptor{MediaType: mediaType, Digest: dgst, Size: int64(len(b))}
}

func writeJSON(t *testing.T, path string, v any) {
	t.Helper()
	b, err := json.Marshal(v)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, b, 0o644))
}

// tarDir writes the files under dir into the tar archive out.
func tarDir(t *testing.T, dir, out string) {
	t.Helper()
	f, err := os.Create(out)
	require.NoError(t, err)
	defer f.Close()
	tw := tar.NewWriter(f)
	require.NoError(t, filepath.Walk(dir, func(path string, fi os.FileInfo, err error) error {
		if err != nil || path == dir {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		hdr, err := tar.FileInfoHeader(fi, "")
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		if fi.IsDir() {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if fi.Mode().IsRegular() {
			src, err := os.Open(path)
			if err != nil {
				return err
			}
			defer src.Close()
			if _, err := io.Copy(tw, src); err != nil {
				return err
			}
		}
		return nil
	}))
	require.NoError(t, tw.Close())
	require.NoError(t, f.Close())
}

// busyboxLayer is a root filesystem with a static busybox as /bin/sh and
// the applets the tests use.
func busyboxLayer() layer {
	l := layer{
		{name: "bin/", typeflag: tar.TypeDir},
		{name: "bin/busybox", bodyFrom: busyboxPath, mode: 0o755},
		{name: "etc/", typeflag: tar.TypeDir},
		{name: "tmp/", typeflag: tar.TypeDir, mode: 0o1777},
		{name: "proc/", typeflag: tar.TypeDir},
		{name: "sys/", typeflag: tar.TypeDir},
		{name: "dev/", typeflag: tar.TypeDir},
	}
	for _, applet := range []string{"sh", "cat", "echo", "ls", "test", "sleep", "mkdir", "rm", "wc"} {
		l = append(l, entry{name: "bin/" + applet, typeflag: tar.TypeSymlink, link: "busybox"})
	}
	return l
}

// smallImage has three layers: busybox; a message and a file to remove;
// a new message and the whiteout of that file.
func smallImage(t *testing.T) image {
	return buildImage(t, "small", true,
		busyboxLayer(),
		layer{
			{name: "etc/e2e-message", body: []byte("from layer 2\n")},
			{name: "etc/removed", body: []byte("removed by layer 3\n")},
			{name: "data/", typeflag: tar.TypeDir},
			{name: "data/kept", body: []byte("kept\n")},
		},
		layer{
			{name: "etc/e2e-message", body: []byte("from layer 3\n")},
			{name: "etc/.wh.removed"},
		},
	)
}

// bigImage has busybox under two layers of many files each (files*size
// bytes, incompressible): copying a parent and applying a layer take long
// enough to kill the daemon in the middle of an unpack.
func bigImage(t *testing.T, files int, size int64) image {
	big := func(dir string, seedBase uint64) layer {
		l := layer{{name: dir + "/", typeflag: tar.TypeDir}}
		for i := range files {
			l = append(l, entry{name: fmt.Sprintf("%s/f%05d", dir, i), size: size, seed: seedBase + uint64(i)})
		}
		return l
	}
	return buildImage(t, "big", false,
		busyboxLayer(),
		big("big1", 1<<20),
		big("big2", 2<<20),
		layer{{name: "etc/e2e-message", body: []byte("big\n")}},
	)
}
