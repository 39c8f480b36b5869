package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestFlagAndAddressErrors: mistakes on the command line are usage errors
// (exit 2), in one line, found before anything is dialled.
func TestFlagAndAddressErrors(t *testing.T) {
	path := boltFixture(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"ls", "--store", "etcd://127.0.0.1:1/x", "--dial-timeout", "0"}, "--dial-timeout must be positive, not 0s"},
		{[]string{"ls", "--store", path, "--dial-timeout", "-1s"}, "--dial-timeout must be positive, not -1s"},
		{[]string{"ls", "--store", "etcd://127.0.0.1/x"}, `etcd endpoint "127.0.0.1" of store address "etcd://127.0.0.1/x" has no port (want host:2379)`},
		{[]string{"ls", "--store", "etcd://h1:2379,h2/x"}, `etcd endpoint "h2" of store address`},
		{[]string{"ls", "--store", "etcd://127.0.0.1:1/x", "--cacert", filepath.Join(t.TempDir(), "none.pem")}, "TLS settings: "},
		{[]string{"ls", "--store", "etcd://127.0.0.1:1/x", "--cert", path, "--key", path}, "TLS settings: "},
	} {
		t.Run(strings.Join(tc.args, "_"), func(t *testing.T) {
			start := time.Now()
			wantFail(t, exe(t, tc.args...), 2, tc.want)
			assert.Less(t, time.Since(start), 5*time.Second)
		})
	}
}

// TestInterruptExits130: SIGINT ends a command that waits (here for an
// etcd that accepts connections and never answers) at once, with exit code
// 130 and one line.
func TestInterruptExits130(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	connected := make(chan struct{}, 1)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			select {
			case connected <- struct{}{}:
			default:
			}
		}
	}()
	cmd := exec.Command(binary, "ls", "--store", "etcd://"+l.Addr().String()+"/x", "--dial-timeout", "1m")
	cmd.Env = cleanEnv()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	// Once it dials, the tool handles signals: it installs its handler
	// first thing.
	select {
	case <-connected:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("the tool never dialled")
	}
	start := time.Now()
	require.NoError(t, cmd.Process.Signal(os.Interrupt))
	err = cmd.Wait()
	assert.Less(t, time.Since(start), 5*time.Second)
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, 130, ee.ExitCode())
	assert.Equal(t, "snapmeta: interrupted\n", stderr.String())
}

// TestTermEndsAnImportWaitingForItsInput: SIGTERM ends an import that
// reads a pipe nobody writes to at once, with exit code 143 and one line,
// and leaves no store behind.
func TestTermEndsAnImportWaitingForItsInput(t *testing.T) {
	path := filepath.Join(t.TempDir(), "new.db")
	cmd := exec.Command(binary, "import", "--store", path)
	cmd.Env = cleanEnv()
	stdin, err := cmd.StdinPipe() // held open, never written
	require.NoError(t, err)
	defer stdin.Close()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	// The handler is installed first thing; give the tool time to reach
	// its read of stdin.
	time.Sleep(500 * time.Millisecond)
	start := time.Now()
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("the import went on reading its input after SIGTERM")
	}
	assert.Less(t, time.Since(start), 5*time.Second)
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, 143, ee.ExitCode())
	assert.Equal(t, "snapmeta: interrupted\n", stderr.String())
	assert.NoFileExists(t, path)
}

// TestFailedImportLeavesNoFile: an import into a new bbolt file that fails
// before it has imported anything removes the file it created; one into an
// existing file leaves it.
func TestFailedImportLeavesNoFile(t *testing.T) {
	orphan := `{"name":"a","id":"5","kind":"active","parent":"ghost","labels":{},"created":"2025-01-01T00:00:00Z","updated":"2025-01-01T00:00:00Z","usage":{"size":0,"inodes":0}}` + "\n"
	path := filepath.Join(t.TempDir(), "new.db")
	wantFail(t, snapmeta(t, orphan, nil, "import", "--store", path), 1, `missing parent "ghost" (0 imported before this)`)
	_, err := os.Stat(path)
	assert.ErrorIs(t, err, os.ErrNotExist)

	existing := boltWith(t, "b")
	wantFail(t, snapmeta(t, orphan, nil, "import", "--store", existing), 1, `missing parent "ghost"`)
	assert.FileExists(t, existing)
}

// readUntilDone: a read blocked on a silent input ends with the context's
// cause once the context ends, and closing the reader early ends the copy
// of a long input (TestMain's leak check sees a copy left running).
func TestReadUntilDoneEndsWithTheContextAndOnClose(t *testing.T) {
	silent, writer := io.Pipe()
	defer writer.Close()
	ctx, cancel := context.WithCancelCause(context.Background())
	r := readUntilDone(ctx, silent)
	defer r.Close()
	why := errors.New("signal")
	time.AfterFunc(50*time.Millisecond, func() { cancel(why) })
	_, err := r.Read(make([]byte, 1))
	assert.ErrorIs(t, err, why)

	long := readUntilDone(context.Background(), strings.NewReader(strings.Repeat("x", 1<<20)))
	_, err = long.Read(make([]byte, 10))
	require.NoError(t, err)
	require.NoError(t, long.Close())
}
