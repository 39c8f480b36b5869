package main

import "strings"

// classWords pairs each errdefs class, as its error prints, with words that
// already say it. Library errors end in their class (": not found") so that
// programs can tell them apart; a person reading "does not exist: not found"
// reads the same thing twice.
var classWords = []classPhrase{
	{"not found", []string{"does not exist", "not found", "missing", "no such"}},
	{"already exists", []string{"exists"}},
	{"data loss", []string{"corrupt", "damaged", "cannot be read", "does not decode"}},
	{"invalid argument", []string{"invalid", "must be", "must not"}},
	{"failed precondition", []string{"failed precondition", "is alive"}},
	{"unavailable", []string{"unavailable", "did not answer", "locked"}},
	{"resource exhausted", []string{"too large", "exhausted"}},
	{"conflict", []string{"conflict"}},
	{"permission denied", []string{"permission denied"}},
}

// classPhrase is an errdefs class and the words that say it.
type classPhrase struct {
	class string
	words []string
}

// sayClassOnce drops a class (": not found") from msg where the words
// since the previous class (or the start) already say it, so that every
// error of a (possibly joined) message names its class once.
func sayClassOnce(msg string) string {
	var out strings.Builder
	seg := 0 // start of the words the next class is judged by, in out
	for {
		j, c := nextClass(msg)
		if j < 0 {
			out.WriteString(msg)
			return out.String()
		}
		out.WriteString(msg[:j])
		tag := ": " + c.class
		if !saysAny(out.String()[seg:], c.words) {
			out.WriteString(tag)
		}
		seg = out.Len()
		msg = msg[j+len(tag):]
	}
}

// nextClass finds the first class in msg that ends a clause (the end, or a
// space, parenthesis, comma or semicolon follows it).
func nextClass(msg string) (int, *classPhrase) {
	best := -1
	var found *classPhrase
	for i := range classWords {
		c := &classWords[i]
		tag := ": " + c.class
		for from := 0; ; {
			j := strings.Index(msg[from:], tag)
			if j < 0 {
				break
			}
			j += from
			end := j + len(tag)
			if end == len(msg) || strings.ContainsRune(" ),;", rune(msg[end])) {
				if best < 0 || j < best {
					best, found = j, c
				}
				break
			}
			from = end
		}
	}
	return best, found
}

func saysAny(s string, words []string) bool {
	for _, w := range words {
		if strings.Contains(s, w) {
			return true
		}
	}
	return false
}
