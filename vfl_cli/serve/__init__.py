"""Online serving (issue 19, in progress): what a party needs to answer for one customer now."""
